"""The decode side of a KV transfer: pulls blocks from TransferEndpoints into a local pool, over the path the
peers share (paths: tcp anywhere, on a plain TCP stream beside the control socket where it can be opened, see
stream.py; shm on one host, see shm.py), with the protocol of wire.py."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import secrets
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import orjson
import zmq

from pdserve.kv import shm, stream, wire
from pdserve.kv.errors import (REFUSAL_REASONS, LayoutMismatch, PathUnavailable, TransferError,
                               TransferIntegrityError, TransferRefused, TransferResult, TransferTimeout)
from pdserve.kv.host import host_id
from pdserve.kv.pool import BatchStream, BlockPool, batch_iov, batch_pieces, pieces_checksums

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", *wire.PATHS)  # what --kv-transport takes
_MAX_IDLE_SOCKETS_PER_ADDRESS = 4


class _Cancelled(Exception):
    pass


class _Connection:
    """A DEALER socket to one endpoint and a monitor that reports when the endpoint drops the TCP connection
    (its process died or stopped): a pull waiting on it fails at once instead of at its deadline."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.stream: socket.socket | None = None  # tcp pulls' bytes (stream.py), once set up
        self.stream_ticket: str | None = None
        self.bounce: memoryview | None = None  # the stream's receive buffer (stream.BOUNCE_NBYTES)
        self.asked_for_stream = False  # a connection tries once; pulls on it use frames if that failed

    def was_dropped(self) -> bool:
        """Whether the endpoint dropped the connection since the last look."""
        try:
            self.monitor.recv_multipart(zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


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
                 tune_malloc: bool = True, transport: str = "auto", tcp_stream: bool | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        # tcp bytes on the endpoint's plain TCP stream (stream.py), or as ZeroMQ frames; None: by this host's cores
        self.tcp_stream = stream.prefers_stream() if tcp_stream is None else tcp_stream
        self._stream_refused: dict[str, str] = {}  # endpoint address -> why its stream could not be opened
        self._shm_usable: bool | None = None  # can this process make the call at all; asked at the first shm pull
        self._shm_refused: dict[str, str] = {}  # endpoint address -> why its memory could not be read
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
        self._idle: dict[str, list[_Connection]] = {}

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
    ) -> TransferResult:
        """Copy remote blocks into local ones (remote_block_ids[i] -> local_block_ids[i]) within timeout_s, over
        the path choose_path() picks for the peer (its host id and offered transports come with its KV-ready);
        result.transport says which. A same-host path that turns out not to work is given up for that peer
        with one WARNING, counted in `fallbacks`, and the pull goes over TCP within the same deadline.

        Raises a TransferError subclass on any failure; the local blocks' contents are then undefined. When
        pull() returns or raises (cancellation included), nothing writes into the local blocks any more.
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
                                         list(local_block_ids), timeout_s, deadline, traceparent)
        except PathUnavailable as e:
            self._fall_back(address, str(e), path)
            return await self._pull_over("tcp", address, transfer_id, token, list(remote_block_ids), pool,
                                         list(local_block_ids), timeout_s, deadline, traceparent)

    def choose_path(self, address: str, peer_host_id: str, peer_transports: Sequence[str],
                    pool: BlockPool | None = None) -> str:
        """On this host (same host id): cuda-ipc when both pools are on GPUs and the peer offers it, else shm when
        the peer offers it and this process can read its memory; else tcp. A path asked for (transport="shm" or
        "cuda-ipc") that cannot be taken falls back to tcp with a WARNING."""
        if self.transport == "tcp":
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

    def _fall_back(self, address: str, why: str, wanted: str = "shm") -> None:
        if self._remember_refusal(self._shm_refused, address, why, why):
            logger.warning("kv pulls from %s use tcp instead of %s: %s", address, wanted, why)

    def _remember_refusal(self, refused: dict[str, str], address: str, why: str, counted_as: str) -> bool:
        """Note that a path does not work with this peer, and count it; whether it is the first time."""
        with self._fallbacks_lock:
            first = address not in refused
            refused.setdefault(address, why)
            self.fallbacks[counted_as] += 1
        return first

    async def _pull_over(self, path, address, transfer_id, token, remote_ids, pool, local_ids, timeout_s, deadline,
                         traceparent) -> TransferResult:
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._pull_blocking, path, address, transfer_id, token, remote_ids, pool,
            local_ids, timeout_s, deadline, traceparent, cancel)
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
        with self._idle_lock:
            for connections in self._idle.values():
                for conn in connections:
                    conn.close()
            self._idle.clear()
        self._ctx.term()

    def _checkout(self, address: str, transfer_id: str) -> _Connection:
        with self._idle_lock:
            connections = self._idle.get(address)
            conn = connections.pop() if connections else None
        if conn is not None:
            if not conn.was_dropped():
                return conn
            conn.close()
        conn = _Connection(self._ctx, address)
        try:
            conn.sock.connect(address)
        except zmq.ZMQError as e:
            conn.close()
            raise TransferError(f"transfer {transfer_id}: cannot connect to {address!r} ({e}); "
                                "the address must look like tcp://host:port") from e
        return conn

    def _checkin(self, conn: _Connection) -> None:
        with self._idle_lock:
            connections = self._idle.setdefault(conn.address, [])
            if not self._closing.is_set() and len(connections) < _MAX_IDLE_SOCKETS_PER_ADDRESS:
                connections.append(conn)
                return
        conn.close()

    def _pull_blocking(self, path, address, transfer_id, token, remote_ids, pool, local_ids, timeout_s, deadline,
                       traceparent, cancel) -> TransferResult:
        started = time.monotonic()
        nonce = secrets.token_hex(8)
        request = {
            "v": wire.PROTOCOL_VERSION, "op": "pull", "nonce": nonce, "transfer_id": transfer_id, "token": token,
            "block_ids": remote_ids, "segment_nbytes": list(pool.segment_nbytes), "layout_tag": pool.layout_tag,
            "traceparent": traceparent, "window": self._window, "timeout_s": timeout_s, "path": path,
        }
        block_nbytes = sum(pool.segment_nbytes)
        num_blocks = len(remote_ids)
        conn = self._checkout(address, transfer_id)
        sock = conn.sock
        clean = False
        try:
            if path == "tcp" and self.tcp_stream and not conn.asked_for_stream and address not in self._stream_refused:
                self._open_stream(conn, deadline, cancel, transfer_id, num_blocks, timeout_s)
            if path == "tcp" and conn.stream is not None:
                sock.send(orjson.dumps(dict(request, stream=conn.stream_ticket)), zmq.NOBLOCK)
                self._receive_stream(conn, nonce, pool, local_ids, deadline, cancel, transfer_id, timeout_s)
            else:
                sock.send(orjson.dumps(request), zmq.NOBLOCK)  # queued on the connecting pipe; nothing blocks here
                self._receive_replies(conn, nonce, path, pool, local_ids, remote_ids, deadline, cancel, transfer_id,
                                      timeout_s)
            clean = True
        except _Cancelled as e:  # carries how many blocks had arrived, where the receiver knew
            raise TransferError(f"transfer {transfer_id}: pull cancelled after {e.args[0] if e.args else 0} of "
                                f"{num_blocks} blocks") from None
        finally:
            if clean:
                self._checkin(conn)
            else:
                conn.close()
        seconds = time.monotonic() - started
        result = TransferResult(num_blocks, num_blocks * block_nbytes, seconds, path)
        logger.debug("transfer %s: pulled %d blocks, %d bytes over %s in %.4f s (%.2f GB/s)", transfer_id, num_blocks,
                     result.num_bytes, path, seconds, result.gbps)
        return result

    def _receive_replies(self, conn: _Connection, nonce: str, path: str, pool: BlockPool, local_ids: list[int],
                         remote_ids: list[int], deadline, cancel, transfer_id: str, timeout_s: float) -> None:
        """The pull's replies on the control connection: tcp frames, shm descriptions, or the cuda-ipc description
        and its confirmation."""
        address, sock, num_blocks = conn.address, conn.sock, len(local_ids)
        checks: list = []  # shm: each batch's checksum check, running while the next batch is copied
        received = 0
        try:
            batch: BatchStream | None = None
            owed, credit_every = 0, max(1, self._window // 4)  # fewer credit messages, fewer endpoint wake-ups
            while received < num_blocks:
                frames = self._receive(conn, deadline, cancel, transfer_id, received, num_blocks, timeout_s)
                header = self._parse_header(frames[0], transfer_id, address)
                if header.get("nonce") != nonce:
                    logger.debug("transfer %s: ignored a reply for another pull", transfer_id)
                    continue
                if header.get("k") == "error":
                    raise self._error_from(header, transfer_id, address)
                first, count, checksums = header.get("i"), header.get("c"), header.get("h")
                try:
                    kind = {"shm": "shm", "cuda-ipc": "cuda"}.get(path, "data")
                    if header.get("k") != kind or first != received or not isinstance(
                            count, int) or not (0 < count <= num_blocks - received):
                        raise ValueError(f"unexpected header {str(header)[:200]}")
                    if path == "cuda-ipc":
                        self._copy_device(header, pool, local_ids, remote_ids)
                        confirmed = self._confirm(conn, nonce, deadline, cancel, transfer_id, num_blocks, timeout_s)
                        if not confirmed:
                            raise TransferIntegrityError(
                                f"transfer {transfer_id}: the prefill side released it while its blocks were being "
                                f"copied from {address} (they may have been reused under the copy); recompute the "
                                "prefill")
                        received = num_blocks
                    elif path == "shm":
                        ids = local_ids[first:first + count]
                        _read_described(header, pool, ids)
                        checks.append(self._checker.submit(_check_described, header, pool, ids, transfer_id, address))
                        received += count
                    elif batch is None:
                        ids = local_ids[first:first + count]
                        # A staging pool (GPU KV) moves each segment on to the device as soon as it is here.
                        after = functools.partial(commit, ids) if (commit := getattr(pool, "commit_segment", None)) else None
                        batch = BatchStream(pool, ids, after_segment=after)
                    for frame in frames[1:] if path == "tcp" else ():
                        src, offset = frame.buffer, 0
                        for dst in batch.walk(src.nbytes):
                            dst[:] = src if dst.nbytes == src.nbytes else src[offset:offset + dst.nbytes]
                            offset += dst.nbytes
                    if checksums is not None and path == "tcp":
                        if batch.nbytes_left or not isinstance(checksums, list) or len(checksums) != len(
                                pool.segment_nbytes):
                            raise ValueError(f"batch of blocks {first}.. ended early or with a bad checksum list")
                        _check(batch.checksums(), checksums, transfer_id, first, count, local_ids, address)
                        batch, received = None, received + count
                except ValueError as e:
                    raise TransferError(f"transfer {transfer_id}: malformed reply from {address} ({e}); both sides "
                                        "must run the same pdserve version") from e
                owed += 1
                if received < num_blocks and owed >= credit_every:
                    sock.send(orjson.dumps({"op": "credit", "nonce": nonce, "n": owed}), zmq.NOBLOCK)
                    owed = 0
        except _Cancelled:
            raise _Cancelled(received) from None
        for check in checks:  # every batch's checksums, before the pull counts as done
            check.result()

    def _open_stream(self, conn: _Connection, deadline, cancel, transfer_id, num_blocks, timeout_s) -> None:
        """A new connection's byte stream (stream.py): ask the endpoint where, connect, present the ticket. Where
        that fails for want of a route to the stream port, this endpoint's pulls use frames, with one WARNING."""
        conn.asked_for_stream = True
        nonce = secrets.token_hex(8)
        conn.sock.send(orjson.dumps({"op": "hello", "nonce": nonce}), zmq.NOBLOCK)
        while True:
            frames = self._receive(conn, deadline, cancel, transfer_id, 0, num_blocks, timeout_s)
            header = self._parse_header(frames[0], transfer_id, conn.address)
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

    def _receive_stream(self, conn: _Connection, nonce: str, pool: BlockPool, local_ids: list[int], deadline,
                        cancel, transfer_id: str, timeout_s: float) -> None:
        """tcp over the stream: each batch's head, its bytes (through the connection's small buffer into the local
        blocks), its checksums."""
        num_blocks, nseg = len(local_ids), len(pool.segment_nbytes)
        head, trailer = bytearray(stream.BATCH_HEAD.size), bytearray(8 * nseg)
        commit = getattr(pool, "commit_segment", None)
        fill = functools.partial(self._fill, conn, nonce, deadline, cancel, transfer_id, num_blocks, timeout_s)
        received = 0
        try:
            while received < num_blocks:
                fill(memoryview(head), received)
                first, count = stream.BATCH_HEAD.unpack(head)
                if first != received or not 0 < count <= num_blocks - received:
                    raise TransferError(f"transfer {transfer_id}: malformed stream from {conn.address} (batch {first}+"
                                        f"{count} after {received} of {num_blocks}); both sides must run the same "
                                        "pdserve version")
                ids = local_ids[first:first + count]
                batch = BatchStream(pool, ids, after_segment=functools.partial(commit, ids) if commit else None)
                while batch.nbytes_left:
                    for view in batch.walk(min(stream.CHUNK_NBYTES, batch.nbytes_left)):
                        fill(view, received)
                fill(memoryview(trailer), received)
                _check(batch.checksums(), list(struct.unpack(f"<{nseg}Q", trailer)), transfer_id, first, count,
                       local_ids, conn.address)
                received += count
        except _Cancelled:
            raise _Cancelled(received) from None

    def _fill(self, conn: _Connection, nonce: str, deadline, cancel, transfer_id, num_blocks, timeout_s, view,
              received) -> None:
        """Receive exactly len(view) bytes of the stream into view, within the pull's deadline; a refusal on the
        control socket, cancellation, close() or the endpoint hanging up end it with the matching error."""
        got, total = 0, view.nbytes
        bounce = conn.bounce
        while got < total:
            try:
                n = conn.stream.recv_into(bounce[:total - got] if total - got < bounce.nbytes else bounce)
                if n == 0:
                    raise ConnectionResetError("end of stream")
                view[got:got + n] = bounce[:n]
                got += n
                continue
            except BlockingIOError:  # SO_RCVTIMEO passed with nothing: look around, then wait again
                pass
            except OSError as e:  # the endpoint closed the stream: a refusal says why, else it is gone
                self._raise_control_error(conn, nonce, transfer_id, wait_s=0.2)
                raise _closed(transfer_id, conn.address, received, num_blocks, f"{e}; ") from e
            self._time_left(cancel, deadline, transfer_id, conn.address, received, num_blocks, timeout_s)
            self._raise_control_error(conn, nonce, transfer_id, wait_s=0)

    def _raise_control_error(self, conn: _Connection, nonce: str, transfer_id: str, wait_s: float) -> None:
        """A stream pull's refusal, if the endpoint sent one on the control socket (waiting up to wait_s for it)."""
        until = time.monotonic() + wait_s
        while True:
            try:
                frames = conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                left = until - time.monotonic()
                if left <= 0 or not conn.sock.poll(max(1, math.ceil(left * 1000))):
                    return
                continue
            header = self._parse_header(frames[0], transfer_id, conn.address)
            if header.get("nonce") == nonce and header.get("k") == "error":
                raise self._error_from(header, transfer_id, conn.address)

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

    def _confirm(self, conn: _Connection, nonce: str, deadline, cancel, transfer_id, num_blocks, timeout_s) -> bool:
        """cuda-ipc: whether the endpoint still held the transfer once the copy was done."""
        conn.sock.send(orjson.dumps({"op": "done", "nonce": nonce}), zmq.NOBLOCK)
        while True:
            frames = self._receive(conn, deadline, cancel, transfer_id, 0, num_blocks, timeout_s)
            header = self._parse_header(frames[0], transfer_id, conn.address)
            if header.get("nonce") != nonce:
                continue
            if header.get("k") == "error":
                raise self._error_from(header, transfer_id, conn.address)
            return header.get("k") == "done" and header.get("ok") is True

    def _receive(self, conn: _Connection, deadline, cancel, transfer_id, received, num_blocks, timeout_s) -> list:
        address = conn.address
        while True:
            left = self._time_left(cancel, deadline, transfer_id, address, received, num_blocks, timeout_s)
            # Data first, without a poll when it is already there (the common case while a pull streams);
            # the monitor is looked at only between waits, so a dropped connection fails the pull within
            # one wire.CLIENT_POLL_S, and what arrived before the drop is still read.
            with contextlib.suppress(zmq.Again):
                return conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            if conn.was_dropped():
                raise _closed(transfer_id, address, received, num_blocks)
            conn.sock.poll(max(1, math.ceil(min(left, wire.CLIENT_POLL_S) * 1000)))

    def _time_left(self, cancel, deadline, transfer_id, address, received, num_blocks, timeout_s) -> float:
        """Seconds left to the pull's deadline; raises when it passed, or on cancellation or close()."""
        if cancel.is_set() or self._closing.is_set():
            if self._closing.is_set() and not cancel.is_set():
                raise TransferError(f"transfer {transfer_id}: TransferClient closed during the pull")
            raise _Cancelled()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(
                f"transfer {transfer_id}: got {received} of {num_blocks} blocks from {address} within "
                f"timeout_s={timeout_s}: the prefill endpoint is stalled, gone or unreachable; check the "
                "address is reachable from this host (prefill --advertise-host) or raise the timeout")
        return left

    @staticmethod
    def _parse_header(frame, transfer_id: str, address: str) -> dict:
        try:
            header = orjson.loads(frame.buffer)
        except orjson.JSONDecodeError as e:
            raise TransferError(f"transfer {transfer_id}: unreadable reply from {address}; is that a pdserve "
                                "transfer endpoint?") from e
        if not isinstance(header, dict):
            raise TransferError(f"transfer {transfer_id}: unreadable reply from {address}")
        return header

    @staticmethod
    def _error_from(header: dict, transfer_id: str, address: str) -> TransferError:
        reason, message = header.get("reason"), f"{header.get('message')} (endpoint {address})"
        if reason == "layout":
            return LayoutMismatch(message)
        if reason in REFUSAL_REASONS:
            return TransferRefused(reason, message)
        return TransferError(f"transfer {transfer_id}: endpoint refused ({reason}): {message}")


def _closed(transfer_id: str, address: str, received: int, num_blocks: int, detail: str = "") -> TransferError:
    return TransferError(f"transfer {transfer_id}: the prefill endpoint {address} closed the connection after {received} "
                         f"of {num_blocks} blocks ({detail}its process stopped or died); recompute the prefill")


def _check(got: list[int], want: list[int], transfer_id: str, first: int, count: int, local_ids: list[int],
           address: str) -> None:
    bad = [k for k, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        raise TransferIntegrityError(
            f"transfer {transfer_id}: blocks {first}..{first + count - 1} (local ids {local_ids[first]}..) from "
            f"{address} failed their xxh3 checksum in segment {bad[0]} ({len(bad)} of {len(want)} segments bad): "
            "the bytes changed in flight or the prefill side reused a block before the pull finished; recompute "
            "the prefill")


def _read_described(header: dict, pool: BlockPool, local_ids: list[int]) -> None:
    """shm: copy a batch the endpoint described (where it lies in its process) into the local blocks. ValueError
    for a malformed description."""
    pid, iov, want = header.get("pid"), header.get("iov"), header.get("h")
    nseg = len(pool.segment_nbytes)
    if not (type(pid) is int and pid > 0 and isinstance(iov, list) and isinstance(want, list) and len(want) == nseg
            and all(isinstance(p, list) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p) for p in iov)
            and sum(p[1] for p in iov) == len(local_ids) * sum(pool.segment_nbytes)):
        raise ValueError(f"bad shm batch description {str(header)[:200]}")
    shm.read_remote(pid, batch_iov(pool, local_ids), iov)


def _check_described(header: dict, pool: BlockPool, local_ids: list[int], transfer_id: str, address: str) -> None:
    """shm: the copied batch against the checksums the endpoint took when it described it."""
    _check(pieces_checksums(batch_pieces(pool, local_ids), len(pool.segment_nbytes)), header["h"], transfer_id,
           header["i"], len(local_ids), local_ids, address)
