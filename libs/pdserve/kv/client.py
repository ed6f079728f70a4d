"""The decode side of a KV transfer: pulls blocks from TransferEndpoints into a local pool, over the path the
peers share (paths: tcp anywhere, on a plain TCP stream beside the control socket where it can be opened, see
stream.py; shm on one host, see shm.py), with the protocol of wire.py.

This module decides where and how each pull goes: its connection (kept warm per endpoint), the path for the
peer, the fallbacks when a path does not work with it. Receiving one pull's bytes is receiver.py's."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import orjson
import zmq

from pdserve.kv import nixl_landing, nixl_path, shm, stream, wire
from pdserve.kv.errors import PathUnavailable, TransferError, TransferResult
from pdserve.kv.host import host_id
from pdserve.kv.connection import Connection
from pdserve.kv.pool import BlockPool
from pdserve.kv.read_fence import SETTLE_S, ReadFence
from pdserve.kv.receiver import Cancelled, Receiver, parse_header

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", *wire.PATHS)  # what --kv-transport takes
DEFAULT_CONNECT_TIMEOUT_S = 2.0  # as --kv-connect-timeout-s (config.py keeps its own literal: it imports no kv)
_MAX_IDLE_SOCKETS_PER_ADDRESS = 4


class TransferClient:
    """Pulls blocks from TransferEndpoints into a local pool.

    Each pull has a DEALER socket to itself. A socket goes back to an idle set (per address) only after a
    pull that received everything, so nothing is left in flight on it; after any failure it is closed with
    linger 0. Every reply echoes the pull's nonce and mismatches are ignored, so a late reply can never be
    taken for the answer to a later pull. A monitor on each socket fails a pull at once when the endpoint
    drops the connection (its process died), and keeps a dropped idle connection from being reused.
    Reusing connections matters for speed: a fresh TCP connection
    starts with small windows and buffers (measured ~4 ms lost per pull on loopback). The receive loop runs
    in a worker thread with sync zmq; pull() only awaits it.
    """

    def __init__(self, *, io_threads: int = 1, max_concurrent_pulls: int = 16, window_messages: int = 8,
                 tune_malloc: bool = True, transport: str = "auto", tcp_stream: bool | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.connect_timeout_s = connect_timeout_s  # a new connection not made by then: PeerUnreachable
        # tcp bytes on the endpoint's plain TCP stream (stream.py), or as ZeroMQ frames; None: by this host's cores
        self.tcp_stream = stream.prefers_stream() if tcp_stream is None else tcp_stream
        self._stream_refused: dict[str, str] = {}  # endpoint address -> why its stream could not be opened
        self._shm_usable: bool | None = None  # can this process make the call at all; asked at the first shm pull
        self._shm_refused: dict[str, str] = {}  # endpoint address -> why its memory could not be read
        self._nixl: nixl_path.NixlAgent | None = None  # made at the first nixl pull
        self._landings: dict[object, nixl_landing.Landing] = {}  # its landing buffers: by GPU, None for host memory
        self._nixl_refused: dict[str, str] = {}  # endpoint address -> why nixl does not work with it
        self._rdma_active: bool | None = None  # does this host have an active RDMA port; asked once, for auto
        self._fallbacks_lock = threading.Lock()
        self.fallbacks: collections.Counter[str] = collections.Counter()  # "shm->tcp: <why>" -> times
        if tune_malloc:
            wire.tune_malloc_for_transfers()
        self._ctx = zmq.Context(io_threads)
        self._executor = ThreadPoolExecutor(max_concurrent_pulls, thread_name_prefix="kv-pull")
        # shm: a batch's checksums are taken here while the pull's thread already copies the next batch.
        self._checker = ThreadPoolExecutor(2, thread_name_prefix="kv-shm-check")
        self._peer_memory = None  # cuda-ipc: the peers' KV storages opened here (cuda_ipc.PeerMemory)
        self._window = min(max(window_messages, 1), wire.MAX_WINDOW)
        self._closing = threading.Event()
        self._idle_lock = threading.Lock()
        self._idle: dict[str, list[Connection]] = {}
        if transport == "nixl" and nixl_path.why_unavailable() is None:
            # Made now, not at the first pull, which would pay its start (measured: a first 1.5 MB pull over nixl
            # took 0.3 s with vLLM's workers; later ones milliseconds). A failure is the first pull's to report.
            with contextlib.suppress(PathUnavailable):
                self._nixl_agent()

    async def pull(
        self,
        address: str,
        transfer_id: str,
        token: str,
        remote_block_ids: Sequence[int],
        pool: BlockPool,
        local_block_ids: Sequence[int],
        *,
        timeout_s: float,
        traceparent: str | None = None,
        peer_host_id: str = "",
        peer_transports: Sequence[str] = ("tcp",),
        fence: ReadFence | None = None,
    ) -> TransferResult:
        """Copy remote blocks into local ones (remote_block_ids[i] -> local_block_ids[i]) within timeout_s, over
        the path choose_path() picks for the peer (its host id and offered transports come with its KV-ready);
        result.transport says which. A same-host path that turns out not to work is given up for that peer
        with one WARNING, counted in `fallbacks`, and the pull goes over TCP within the same deadline.

        Raises a TransferError subclass on any failure; the local blocks' contents are then undefined. When
        pull() returns or raises (cancellation included), nothing writes into the local blocks any more, unless the
        caller gave a `fence`: the nixl path then READs host KV straight into the local blocks (no landing copy, no
        checksums: the endpoint confirms the transfer was held throughout), and READs that had not ended when the
        pull failed are in the fence. The caller keeps those blocks out of use until fence.ended() (read_fence.py).
        """
        if self._closing.is_set():
            raise TransferError("TransferClient is closed; create a new one")
        if len(remote_block_ids) != len(local_block_ids):
            raise TransferError(
                f"transfer {transfer_id}: {len(remote_block_ids)} remote blocks but {len(local_block_ids)} local "
                "blocks; allocate one local block per remote block")
        bad = [b for b in local_block_ids if not 0 <= b < pool.num_blocks]
        if bad:
            raise ValueError(f"transfer {transfer_id}: local block ids {bad[:8]} outside the pool of {pool.num_blocks}")
        if not remote_block_ids:
            return TransferResult(0, 0, 0.0)
        deadline = time.monotonic() + timeout_s  # taken now: time queued for a worker thread counts too
        path = self.choose_path(address, peer_host_id, peer_transports, pool)
        try:
            return await self._pull_over(path, address, transfer_id, token, list(remote_block_ids), pool,
                                         list(local_block_ids), timeout_s, deadline, traceparent, fence)
        except PathUnavailable as e:
            if fence is not None and not fence.ended():
                raise TransferError(f"transfer {transfer_id}: {e}; READs into the local blocks are still running, "
                                    "so the pull does not go on over tcp; recompute the prefill") from e
            self._fall_back(address, str(e), path)
            return await self._pull_over("tcp", address, transfer_id, token, list(remote_block_ids), pool,
                                         list(local_block_ids), timeout_s, deadline, traceparent)

    def choose_path(self, address: str, peer_host_id: str, peer_transports: Sequence[str],
                    pool: BlockPool | None = None) -> str:
        """On this host (same host id): cuda-ipc when both pools are on GPUs and the peer offers it, else shm when
        the peer offers it and this process can read its memory. Across hosts: nixl when the peer offers it and
        this host has an active RDMA port (UCX then uses verbs), else tcp. A path asked for (transport="shm",
        "cuda-ipc" or "nixl") that cannot be taken falls back to tcp with a WARNING."""
        if self.transport == "tcp":
            return "tcp"
        if self.transport == "nixl" or (self.transport == "auto" and "nixl" in peer_transports
                                        and peer_host_id != host_id() and self._rdma_here()):
            why = self._why_not_nixl(address, peer_transports)
            if why is None:
                return "nixl"
            if self.transport == "nixl":
                self._fall_back(address, why, "nixl")
                return "tcp"
        why = None
        on_gpu = getattr(pool, "device_segments", None) is not None
        wanted = "cuda-ipc" if self.transport == "cuda-ipc" or (self.transport == "auto" and on_gpu) else "shm"
        if not peer_host_id or peer_host_id != host_id():
            why = "the prefill worker is on another host"
        elif wanted == "cuda-ipc" and "cuda-ipc" in peer_transports and on_gpu and address not in self._shm_refused:
            return "cuda-ipc"
        elif wanted == "cuda-ipc" and self.transport == "cuda-ipc":
            why = self._shm_refused.get(address) or (
                "this worker's KV is not on a GPU" if not on_gpu else "the prefill worker does not offer cuda-ipc")
        elif "shm" not in peer_transports:  # shm also moves GPU KV through its host staging slots
            why = "the prefill worker does not offer it (its kernel's Yama ptrace_scope, or --kv-transport)"
        elif address in self._shm_refused:
            why = self._shm_refused[address]
        else:
            if self._shm_usable is None:
                self._shm_usable = shm.available()
            if not self._shm_usable:
                why = "this process may not call process_vm_readv (a seccomp profile?)"
        if why is None:
            return "shm"
        if self.transport in ("shm", "cuda-ipc"):
            self._fall_back(address, why, wanted)
        return "tcp"

    def _why_not_nixl(self, address: str, peer_transports: Sequence[str]) -> str | None:
        if address in self._nixl_refused:
            return self._nixl_refused[address]
        if "nixl" not in peer_transports:
            return ("the prefill worker does not offer it (no NIXL there, a NATS without credentials, or its "
                    "--kv-transport)")
        return nixl_path.why_unavailable()

    def _rdma_here(self) -> bool:
        """Whether this host has an RDMA port up: only then does auto prefer nixl over pdserve's own tcp path."""
        if self._rdma_active is None:
            try:
                from pdserve import rdma_devices
                self._rdma_active = rdma_devices.has_active_port(rdma_devices.list_devices())
            except Exception:  # never a reason for a pull to fail
                logger.debug("rdma device lookup failed", exc_info=True)
                self._rdma_active = False
        return self._rdma_active

    def _fall_back(self, address: str, why: str, wanted: str = "shm") -> None:
        refused = self._nixl_refused if wanted == "nixl" else self._shm_refused
        if self._remember_refusal(refused, address, why, f"{wanted}->tcp: {why}" if wanted == "nixl" else why):
            logger.warning("kv pulls from %s use tcp instead of %s: %s", address, wanted, why)

    def _remember_refusal(self, refused: dict[str, str], address: str, why: str, counted_as: str) -> bool:
        """Note that a path does not work with this peer, and count it; whether it is the first time."""
        with self._fallbacks_lock:
            first = address not in refused
            refused.setdefault(address, why)
            self.fallbacks[counted_as] += 1
        return first

    async def _pull_over(self, path, address, transfer_id, token, remote_ids, pool, local_ids, timeout_s, deadline,
                         traceparent, fence=None) -> TransferResult:
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._pull_blocking, path, address, transfer_id, token, remote_ids, pool,
            local_ids, timeout_s, deadline, traceparent, cancel, fence)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            # The caller may reuse the local blocks as soon as we re-raise: wait for the writer to stop.
            try:
                await asyncio.wait({future})
            finally:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved, so asyncio does not log it as never retrieved
            raise

    def close(self) -> None:
        """Stop: pulls in flight raise TransferError within ~50 ms; then the zmq context is closed."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._checker.shutdown(wait=True, cancel_futures=True)
        if self._nixl is not None:
            for landing in self._landings.values():
                landing.close()
            self._nixl.close()
        with self._idle_lock:
            for connections in self._idle.values():
                for conn in connections:
                    conn.close()
            self._idle.clear()
        self._ctx.term()

    def _checkout(self, address: str, transfer_id: str) -> Connection:
        with self._idle_lock:
            connections = self._idle.get(address)
            conn = connections.pop() if connections else None
        if conn is not None:
            if not conn.was_dropped():
                return conn
            conn.close()
        conn = Connection(self._ctx, address, self.connect_timeout_s)
        try:
            conn.sock.connect(address)
        except zmq.ZMQError as e:
            conn.close()
            raise TransferError(f"transfer {transfer_id}: cannot connect to {address!r} ({e}); "
                                "the address must look like tcp://host:port") from e
        return conn

    def _checkin(self, conn: Connection) -> None:
        with self._idle_lock:
            connections = self._idle.setdefault(conn.address, [])
            if not self._closing.is_set() and len(connections) < _MAX_IDLE_SOCKETS_PER_ADDRESS:
                connections.append(conn)
                return
        conn.close()

    def _pull_blocking(self, path, address, transfer_id, token, remote_ids, pool, local_ids, timeout_s, deadline,
                       traceparent, cancel, fence=None) -> TransferResult:
        started = time.monotonic()
        nonce = secrets.token_hex(8)
        request = {
            "v": wire.PROTOCOL_VERSION, "op": "pull", "nonce": nonce, "transfer_id": transfer_id, "token": token,
            "block_ids": remote_ids, "segment_nbytes": list(pool.segment_nbytes), "layout_tag": pool.layout_tag,
            "traceparent": traceparent, "window": self._window, "timeout_s": timeout_s, "path": path,
        }
        nixl = self._nixl_agent() if path == "nixl" else None
        if nixl is not None:
            request["nixl_agent"] = nixl.agent_for(address)
            fence = fence if self._reads_into(nixl, pool, fence) else None
            if fence is not None:
                request["direct"] = True
        else:
            fence = None
        block_nbytes = sum(pool.segment_nbytes)
        num_blocks = len(remote_ids)
        conn = self._checkout(address, transfer_id)
        sock = conn.sock
        receiver = Receiver(conn, nonce, transfer_id, num_blocks, deadline, timeout_s, cancel, self._closing)
        clean = False
        try:
            if path == "tcp" and self.tcp_stream and not conn.asked_for_stream and address not in self._stream_refused:
                self._open_stream(receiver)
            if path == "tcp" and conn.stream is not None:
                sock.send(orjson.dumps(dict(request, stream=conn.stream_ticket)), zmq.NOBLOCK)
                receiver.receive_stream(pool, local_ids)
            else:
                sock.send(orjson.dumps(request), zmq.NOBLOCK)  # queued on the connecting pipe; nothing blocks here
                receiver.receive_replies(path, pool, local_ids, remote_ids, window=self._window, checker=self._checker,
                                         copy_device=self._copy_device, nixl=nixl, landing_for=self._landing_for,
                                         fence=fence)
            clean = True
        except Cancelled as e:  # carries how many blocks had arrived, where the receiver knew
            raise TransferError(f"transfer {transfer_id}: pull cancelled after {e.args[0] if e.args else 0} of "
                                f"{num_blocks} blocks") from None
        finally:
            if clean:
                self._checkin(conn)
            else:
                conn.close()
                if fence is not None:
                    fence.wait(SETTLE_S)  # most end at once: the owner then need not set its blocks aside
        seconds = time.monotonic() - started
        result = TransferResult(num_blocks, num_blocks * block_nbytes, seconds, path,
                                landed_on_device=receiver.landed_on_device)
        logger.debug("transfer %s: pulled %d blocks, %d bytes over %s in %.4f s (%.2f GB/s)", transfer_id, num_blocks,
                     result.num_bytes, path, seconds, result.gbps)
        return result

    def _nixl_agent(self) -> nixl_path.NixlAgent:
        """This client's NIXL agent, made once; PathUnavailable where NIXL cannot start."""
        with self._fallbacks_lock:
            if self._nixl is None:
                try:
                    self._nixl = nixl_path.NixlAgent("decode")
                except Exception as e:
                    raise PathUnavailable(f"NIXL cannot start here ({type(e).__name__}: {e})") from e
        return self._nixl

    def _reads_into(self, nixl: nixl_path.NixlAgent, pool: BlockPool, fence: ReadFence | None) -> bool:
        """Whether a nixl pull READs straight into the pool's blocks: the caller gave a fence and the pool is host
        memory this client's agent can register (registered once)."""
        if fence is None:
            return False
        memory = nixl_path.pool_memory(pool)
        if memory is None or memory.kind != "DRAM":
            return False
        try:
            nixl.register(pool)
        except Exception as e:  # NIXL refused the memory: landing buffers, as without a fence
            logger.debug("kv nixl: cannot register the local pool (%s: %s); READs go to landing buffers",
                         type(e).__name__, e)
            return False
        return True

    def _landing_for(self, device) -> nixl_landing.Landing:
        """The nixl landing buffers in that GPU's memory (a torch device), or in host memory (None); made once."""
        with self._fallbacks_lock:
            landing = self._landings.get(device)
            if landing is None:
                landing = self._landings[device] = nixl_landing.Landing(self._nixl, device=device)
        return landing

    def _open_stream(self, receiver: Receiver) -> None:
        """A new connection's byte stream (stream.py): ask the endpoint where, connect, present the ticket. Where
        that fails for want of a route to the stream port, this endpoint's pulls use frames, with one WARNING."""
        conn, transfer_id, deadline = receiver.conn, receiver.transfer_id, receiver.deadline
        conn.asked_for_stream = True
        nonce = secrets.token_hex(8)
        conn.sock.send(orjson.dumps({"op": "hello", "nonce": nonce}), zmq.NOBLOCK)
        while True:
            frames = receiver.receive(0)
            header = parse_header(frames[0], transfer_id, conn.address)
            if header.get("nonce") == nonce:
                break
        port, ticket = header.get("port"), header.get("ticket")
        if header.get("k") != "hello" or port is None:  # an endpoint that offers no stream
            return
        if not (type(port) is int and 0 < port < 65536 and isinstance(ticket, str)):
            raise TransferError(f"transfer {transfer_id}: malformed hello from {conn.address}; both sides must run the "
                                "same pdserve version")
        host = conn.address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        try:
            conn.stream = stream.connect(host, port, bytes.fromhex(ticket),
                                         min(deadline - time.monotonic(), stream.HELLO_TIMEOUT_S), wire.CLIENT_POLL_S)
        except (OSError, ValueError) as e:
            why = f"cannot open its byte stream at {host}:{port} ({e}): only its control port is reachable?"
            if self._remember_refusal(self._stream_refused, conn.address, why, f"tcp stream->frames: {why}"):
                logger.warning("kv pulls from %s go as ZeroMQ frames, slower: %s; open the endpoint's stream port "
                               "(any port of the prefill host) to this host", conn.address, why)
            return
        conn.stream_ticket = ticket
        conn.bounce = memoryview(bytearray(stream.BOUNCE_NBYTES))

    def _copy_device(self, header: dict, pool: BlockPool, local_ids: list[int], remote_ids: list[int]) -> None:
        """cuda-ipc: map the peer's KV tensors (once) and copy the blocks device to device in one kernel."""
        from pdserve.kv import cuda_ipc  # torch only where pools are on GPUs

        segments, rows = header.get("segments"), header.get("rows")
        local = pool.device_segments
        if not (isinstance(segments, list) and len(segments) == len(local) and rows == remote_ids and all(
                isinstance(d, dict) and d.get("row_nbytes") == t.shape[1] for d, t in zip(segments, local))):
            raise ValueError(f"bad cuda-ipc description {str(header)[:200]}")
        with self._fallbacks_lock:
            if self._peer_memory is None:
                self._peer_memory = cuda_ipc.PeerMemory()
        try:
            src_bases = self._peer_memory.base_addresses(segments)
        except RuntimeError as e:  # no peer access, another machine's handle, a driver that refuses IPC
            raise PathUnavailable(f"cannot map the prefill worker's GPU memory ({e})") from e
        table = cuda_ipc.copy_table(src_bases, [d["stride"] for d in segments], [t.data_ptr() for t in local],
                                    [t.stride(0) for t in local], [d["row_nbytes"] for d in segments], rows,
                                    local_ids)
        cuda_ipc.copy(table, local[0].device)
