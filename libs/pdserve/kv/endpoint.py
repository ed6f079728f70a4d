"""The prefill side of a KV transfer: a ZeroMQ ROUTER that serves a pool's blocks to pulls presenting an
allowed transfer id and its token (wire.py has the protocol), over a plain TCP stream beside it (stream.py; over
ZeroMQ frames where a client has none) or, to a puller on this host, as descriptors of its own memory (shm.py).

This module is the endpoint's life and its serving thread: whom it serves and when (requests in, credit, rounds
of sends, reaping). Beside it: ledger.py (leases and counters, shared with the caller's threads), pull_request.py
(whether a request may be served), cutter.py (how a pull's blocks become messages), control_socket.py (the ZeroMQ
ROUTER: its bounds, bursts in, answers out), streamer.py (the byte streams: their sockets, tickets, a pull's turns)."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Sequence

import orjson
import zmq

from pdserve import netaddr
from pdserve.kv import nixl_path, shm, stream, wire
from pdserve.kv.control_socket import ControlSocket
from pdserve.kv.cutter import Cutter, ServedPull
from pdserve.kv.host import host_id
from pdserve.kv.ledger import FORGET_EXPIRED_AFTER_S, Ledger
from pdserve.kv.nixl_gather import GatherBuffers
from pdserve.kv.pool import BlockPool
from pdserve.kv.pull_request import BadRequest, parse_pull, refusal
from pdserve.kv.streamer import StreamEnd, Streamer
from pdserve.throttled_log import ThrottledLog, clip

logger = logging.getLogger(__name__)

_MIN_SPAN_NBYTES = 768 << 10  # see default_batch_blocks()
# One shm message describes this much of a batch: small enough that the endpoint checksums the next batch
# while the puller copies this one, large enough that the per-message work is a small part of it.
SHM_BATCH_NBYTES = 8 << 20


def default_batch_blocks(pool: BlockPool) -> int:
    """32 blocks, or more where segments are small, so that one segment of a run of blocks is a frame of
    at least ~768 KiB. Measured on a 16-core host (benchmarks/transfer.py, SmolLM2 as 60 segments of 6 KiB
    per block): 0.84x the raw socket with 32-block batches (192 KiB frames), 0.96x with 128."""
    return max(32, math.ceil(_MIN_SPAN_NBYTES / max(1, min(pool.segment_nbytes))))


class TransferEndpoint:
    """Serves a pool's blocks to pulls that present an allowed transfer id and its token.

    One thread owns the ROUTER socket; allow()/release()/stats() may be called from any thread.
    batch_blocks: blocks per batch, the unit of checksums and of consecutive-block runs (runs of per-layer
    segments move as one frame, so larger batches help layouts with small segments; memory in flight is
    bounded by the client's credit, not by this). None: default_batch_blocks(pool). on_pull(transfer_id, traceparent, num_blocks, num_bytes,
    seconds, transport) is called on the serving thread after each pull served; keep it short.
    tune_malloc: see wire.tune_malloc_for_transfers(). offer_shm: let pullers on this host read the pool's memory
    themselves (the shm path), where the kernel allows it; `transports` and `host_id` say what is offered, and
    go to pullers in KV-ready (KVTransferParams). offer_stream: serve tcp pulls on a plain TCP stream (stream.py)
    to clients that open one; without it they get ZeroMQ frames. offer_nixl: register the pool with a NIXL agent
    and let pullers READ it (nixl_path.py; the caller decides whether the bus is trusted enough:
    nixl_path.transport_offered), where NIXL loads and the pool has fixed host memory.
    """

    def __init__(
        self,
        pool: BlockPool,
        *,
        bind_host: str = "0.0.0.0",
        advertise_host: str = "127.0.0.1",
        batch_blocks: int | None = None,
        io_threads: int = 1,
        on_pull: Callable[[str, str | None, int, int, float, str], None] | None = None,
        tune_malloc: bool = True,
        offer_shm: bool = True,
        offer_stream: bool = True,
        offer_nixl: bool = False,
    ) -> None:
        # An explicit batch_blocks is the unit of both paths; by default each path has its own.
        self.shm_batch_blocks = batch_blocks or max(1, SHM_BATCH_NBYTES // max(1, sum(pool.segment_nbytes)))
        batch_blocks = default_batch_blocks(pool) if batch_blocks is None else batch_blocks
        if batch_blocks < 1:
            raise ValueError(f"batch_blocks must be >= 1, got {batch_blocks}")
        self.pool = pool
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.batch_blocks = batch_blocks
        self.on_pull = on_pull
        self._io_threads = io_threads
        self._tune_malloc = tune_malloc
        self._offer_stream = offer_stream
        self._streams: Streamer | None = None
        self._poller: zmq.Poller | None = None
        self._cutting = threading.Lock()  # held while a message is cut from pool memory; see release()
        self._ledger = Ledger(pool.num_blocks)
        self._cutter = Cutter(pool, batch_blocks, self.shm_batch_blocks, self._ledger.count,
                              direct_batch_blocks=batch_blocks or None)
        self._pulls: list[ServedPull] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._control: ControlSocket | None = None
        self._address: str | None = None
        self._paused_until = 0.0
        self._complaints = ThrottledLog(logger)  # refusals and bad requests: a peer decides how many
        # A pull request names each block once at most (a few bytes each) and a few fields: anything much larger is
        # not a pull; zmq drops the connection of a peer that sends it, before it is held in memory.
        self.max_request_nbytes = 64 * 1024 + 12 * (pool.num_blocks + len(pool.segment_nbytes))
        self.transports: tuple[str, ...] = ("tcp", "shm") if offer_shm and shm.offer() else ("tcp",)
        if getattr(pool, "device_segments", None) and offer_shm:
            self.transports += ("cuda-ipc",)
        nixl_memory = nixl_path.pool_memory(pool) if offer_nixl else None
        if nixl_memory is not None and nixl_path.why_unavailable() is None:
            self.transports += ("nixl",)
        elif offer_nixl:
            logger.warning("kv nixl path not offered: %s", nixl_path.why_unavailable() or
                           f"a {type(pool).__name__} has no fixed memory to register")
        self._nixl: nixl_path.NixlAgent | None = None
        # GPU KV over nixl is read where it lies on the device (nixl_path.py), as over cuda-ipc
        self._nixl_on_device = nixl_memory is not None and nixl_memory.kind == "VRAM"
        self._nixl_describes = {"mem": "VRAM", "dev": nixl_memory.device} if self._nixl_on_device else {}
        self._confirming: dict[tuple[bytes, str], ServedPull] = {}  # cuda-ipc pulls copied, waiting for their "done"
        # A staging pool (GPU KV) copies to the host when a pull over a host path starts (see Cutter for the waits).
        self._prepare_out = getattr(pool, "prepare_out", None)
        self.host_id = host_id()

    # ---- lifecycle

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("TransferEndpoint.address is known only after start()")
        return self._address

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("TransferEndpoint.start() called twice; create a new endpoint to restart")
        if self._tune_malloc:
            wire.tune_malloc_for_transfers()
        if "nixl" in self.transports:  # registered once; its metadata goes only to pullers with a valid token
            try:
                self._nixl = nixl_path.NixlAgent("prefill")
                self._nixl.register(self.pool)
                if self._nixl_on_device:  # registered before the metadata is taken: pullers must know them
                    self._cutter.gather_buffers = GatherBuffers(
                        self._nixl, self.pool.device_segments[0].device,
                        self._cutter.device_batch_blocks * sum(self.pool.segment_nbytes), self._pull_alive)
                    self._cutter.gather_buffers.prepare()
                self._nixl_metadata = nixl_path.encode_metadata(self._nixl.metadata)
            except Exception as e:  # the other paths still serve: never a reason for the endpoint not to start
                logger.warning("kv nixl path not offered: NIXL could not register the KV pool (%s: %s)",
                               type(e).__name__, e)
                if self._nixl is not None:
                    self._nixl.close()
                    self._nixl = None
                self.transports = tuple(t for t in self.transports if t != "nixl")
        self._ctx = zmq.Context(self._io_threads)
        control = ControlSocket(self._ctx, self.bind_host, self.max_request_nbytes, self._complaints)
        self._poller = zmq.Poller()
        try:
            port = control.bind()
            if self._offer_stream:
                self._streams = Streamer(self.bind_host, self._poller, self._cutter, self._cutting)
        except (zmq.ZMQError, OSError) as e:
            control.close()
            self._ctx.term()
            if isinstance(e, netaddr.BindError):
                raise
            raise netaddr.BindError(e.errno, f"the KV transfer endpoint cannot listen on {self.bind_host} "
                                    f"({e.strerror or e}); pass --bind-host with an address of this host (0.0.0.0: "
                                    "all of them)") from e
        adv = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        self._address = f"tcp://{adv}:{port}"
        self._cutter.coalesce_below = max(wire.ZERO_COPY_MIN_NBYTES, control.sock.copy_threshold)
        self._control = control
        self._poller.register(control.sock, zmq.POLLIN)
        self._thread = threading.Thread(target=self._serve, name=f"kv-endpoint-{port}", daemon=True)
        self._thread.start()
        logger.info("kv transfer endpoint serving on %s (bound %s:%d; paths %s; tcp stream port %s)", self._address,
                    self.bind_host, port, "+".join(self.transports), self._streams.port if self._streams else "none")

    def stop(self) -> None:
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            logger.error("kv transfer endpoint %s: serving thread did not stop within 5 s", self._address)
            return  # closing a socket another thread still uses would crash; the thread is a daemon
        self._control.close()
        if self._streams is not None:
            self._streams.close()
        self._ctx.term()
        if self._cutter.gather_buffers is not None:
            self._cutter.gather_buffers.close()
        if self._nixl is not None:
            self._nixl.close()
        logger.info("kv transfer endpoint %s stopped", self._address)

    # ---- book-keeping (any thread; the ledger's)

    def allow(self, transfer_id: str, token: str, block_ids: Sequence[int], expires_at: float) -> None:
        """Let a pull presenting `token` read `block_ids` until `expires_at` (time.time() based)."""
        self._ledger.allow(transfer_id, token, block_ids, expires_at)

    def release(self, transfer_id: str) -> bool:
        """Forget the transfer: later pulls are refused ("released"), one in progress at its next message.
        Once this returns, the endpoint reads none of the transfer's blocks again (the caller may reuse
        them). Returns False if it was unknown or already released."""
        if not self._ledger.release(transfer_id):
            return False
        with self._cutting:  # a message being cut right now may still read the blocks: wait for it
            pass
        return True

    def stats(self) -> dict:
        return self._ledger.stats()

    # ---- test hooks

    def pause_for_tests(self, seconds: float) -> None:
        """Test hook: the serving thread neither reads nor sends for `seconds` (a stalled prefill)."""
        self._paused_until = time.monotonic() + seconds

    def _corrupt_next_send_for_tests(self) -> None:
        """Test hook: flip a byte of the next message sent, after its blocks' checksums were fed."""
        self._cutter.corrupt_next = True

    # ---- serving thread

    def _serve(self) -> None:
        next_reap = 0.0
        while not self._stopping.is_set():
            ready = any(p.credit > 0 if p.stream is None else not p.stream.outbox for p in self._pulls)
            try:
                events = dict(self._poller.poll(0 if ready else wire.POLL_MS))
                if self._paused_until > time.monotonic():  # checked after poll: pausing may race with it
                    self._stopping.wait(min(self._paused_until - time.monotonic(), wire.POLL_MS / 1000))
                    continue
                if events.pop(self._control.sock, 0):
                    self._receive_all()
                if events:
                    self._on_stream_ends(self._streams.on_events(events))
                self._send_round()
            except Exception:  # one bad message or peer must not take the endpoint down
                logger.exception("kv transfer endpoint %s: unexpected error in serving loop", self._address)
            now = time.monotonic()
            if now >= next_reap:
                self._reap(now)
                next_reap = now + 1.0

    def _on_stream_ends(self, ends: list[StreamEnd]) -> None:
        """What the byte streams met (streamer.py): a pull served, released or failed, or a client gone."""
        for end in ends:
            if end.how == "served":
                self._pulls.remove(end.pull)
                self._finish(end.pull)
            elif end.how == "released":
                self._refuse_released(end.pull)
                self._drop_stream(end.stream, "released mid-pull")  # the client must not wait for the rest
            elif end.how == "failed":
                self._fail(end.pull, end.error)
                self._drop_stream(end.stream, "serving failed")
            else:
                self._drop_stream(end.stream, end.why)

    def _drop_stream(self, s: stream.Stream, why: str) -> None:
        for pull in [p for p in self._pulls if p.stream is s]:
            self._pulls.remove(pull)
            logger.warning("transfer %s: dropped mid-pull (%s)", pull.transfer_id, why)
        self._streams.drop(s)

    def _receive_all(self) -> None:
        for identity, raw in self._control.receive():
            header = None
            try:
                header = orjson.loads(raw)
                if not isinstance(header, dict):
                    raise BadRequest("header is not an object")
                op = header.get("op")
                if op == "pull":
                    self._on_pull_request(identity, header)
                elif op == "credit":
                    self._on_credit(identity, header)
                elif op == "done":
                    self._on_done(identity, header)
                elif op == "hello":
                    self._on_hello(identity, header)
                else:
                    raise BadRequest(f"unknown op {op!r}")
            except (orjson.JSONDecodeError, BadRequest, KeyError, TypeError, ValueError) as e:
                nonce = header.get("nonce") if isinstance(header, dict) else None
                tid = header.get("transfer_id") if isinstance(header, dict) else None
                self._complaints.warning("transfer %s: bad request from peer: %s", clip(tid), clip(e))
                self._ledger.count(num_transfers_refused=1)
                self._control.send_error(identity, nonce if isinstance(nonce, str) else None, "bad_request",
                                         f"malformed pull request ({clip(e)}); client and endpoint must run the same "
                                         "pdserve version")

    def _on_pull_request(self, identity: bytes, h: dict) -> None:
        request = parse_pull(h)
        nonce, tid, path = request.nonce, request.transfer_id, request.path
        if len(self._pulls) >= wire.MAX_PULLS or sum(p.identity == identity for p in self._pulls) >= wire.MAX_PULLS_PER_PEER:
            return self._refuse(identity, nonce, tid, "busy", f"transfer {tid}: the endpoint serves its limit of pulls "
                                f"({wire.MAX_PULLS_PER_PEER} per connection, {wire.MAX_PULLS} in all); retry or recompute")
        allowed, gone = self._ledger.lookup(tid)
        refused = refusal(request, allowed, gone, self.pool, self.transports)
        if refused is not None:
            return self._refuse(identity, nonce, tid, *refused)
        attached = None
        if path == "tcp" and request.stream is not None:
            attached = self._streams.attach(request.stream, identity) if self._streams is not None else None
            if attached is None:
                return self._refuse(identity, nonce, tid, "path", f"transfer {tid}: the stream this pull names is not "
                                    "attached to its connection (or is in use); pull on a new connection")
        block_ids = request.block_ids
        pull = ServedPull(identity, nonce, tid, allowed, block_ids, request.traceparent, request.window,
                          deadline=time.monotonic() + request.timeout_s + 5.0, path=path, stream=attached)
        if attached is not None:
            attached.pull = pull
        if path == "nixl":  # the metadata only for a client that does not know this agent yet (nixl_path.py)
            pull.describe_extra = {"agent": self._nixl.name, **self._nixl_describes, **(
                {"md": self._nixl_metadata} if request.nixl_agent != self._nixl.name else {})}
        pull.confirms = self._reads_device(path) or (path == "nixl" and request.direct)
        self._pulls.append(pull)
        if not self._reads_device(path) and self._prepare_out is not None:
            self._prepare_out(block_ids)  # a staging pool starts its copies to the host now, sent as they land
        logger.debug("transfer %s: serving %d blocks (traceparent %s)", tid, len(block_ids), pull.traceparent)

    def _on_hello(self, identity: bytes, h: dict) -> None:
        """A new control connection asks where its byte stream may connect (stream.py)."""
        answer = self._streams.hello(identity) if self._streams is not None else {"port": None}
        self._control.send_control(identity, {"k": "hello", "nonce": h.get("nonce"), **answer})

    def _on_credit(self, identity: bytes, h: dict) -> None:
        for p in self._pulls:
            if p.identity == identity and p.nonce == h["nonce"]:
                p.credit += int(h.get("n", 1))
                return  # credit for a pull we dropped is harmless

    def _refuse(self, identity: bytes, nonce: str, tid: str, reason: str, message: str) -> None:
        self._complaints.warning("transfer %s: refused (%s): %s", clip(tid), reason, clip(message, 400))
        self._ledger.count(num_transfers_refused=1)
        self._control.send_error(identity, nonce, reason, message)

    def _send_round(self) -> None:
        """One message for each pull that has credit: pulls in flight share the link message by message."""
        for pull in list(self._pulls):
            if pull.stream is not None:
                self._on_stream_ends(self._streams.turn(pull))
                continue
            if pull.credit <= 0:
                continue
            try:
                with self._cutting:
                    if pull.allowed.released:
                        self._refuse_released(pull)
                        continue
                    message = self._cut_message(pull)
                self._control.send(message)
            except zmq.ZMQError as e:
                self._pulls.remove(pull)
                logger.warning("transfer %s: client went away mid-pull (%s); dropped", pull.transfer_id, e)
                continue
            except Exception as e:  # e.g. the pool failed: drop this pull, or the loop would retry it forever
                self._fail(pull, e)
                continue
            if pull.batch is None and pull.next_index == len(pull.block_ids):
                self._pulls.remove(pull)
                if pull.confirms:  # it ends with the client's confirmation (_on_done)
                    self._confirming[(pull.identity, pull.nonce)] = pull
                else:
                    self._finish(pull)

    def _pull_alive(self, pull: ServedPull) -> bool:
        """Whether a pull is still served or waits for its "done" (what was gathered for it is then still read)."""
        return any(p is pull for p in self._pulls) or any(p is pull for p in self._confirming.values())

    def _reads_device(self, path: str) -> bool:
        """Whether a pull over `path` reads the KV where it lies on the GPU (cuda-ipc, nixl from GPU KV): no host
        staging, no checksums, and the pull ends with the client's "done"."""
        return path == "cuda-ipc" or (path == "nixl" and self._nixl_on_device)

    def _refuse_released(self, pull: ServedPull) -> None:
        self._pulls.remove(pull)
        self._refuse(pull.identity, pull.nonce, pull.transfer_id, "released",
                     f"transfer {pull.transfer_id}: released by the prefill side during the pull; recompute the prefill")

    def _fail(self, pull: ServedPull, e: Exception) -> None:
        self._pulls.remove(pull)
        logger.error("transfer %s: serving failed; pull dropped", pull.transfer_id, exc_info=e)
        self._refuse(pull.identity, pull.nonce, pull.transfer_id, "internal",
                     f"transfer {pull.transfer_id}: the prefill endpoint failed while sending ({e!r}); "
                     "see its log, and recompute the prefill")

    def _cut_message(self, pull: ServedPull) -> list:
        """The pull's next message, [identity, header, *frames], its checksums fed from pool memory now."""
        if pull.path == "nixl" and self._nixl_on_device:
            return self._cutter.describe_device_batch(pull)
        if pull.path in ("shm", "nixl"):
            return self._cutter.describe_batch(pull)
        if pull.path == "cuda-ipc":
            return self._describe_device(pull)
        return self._cutter.cut_frames(pull)

    def _describe_device(self, pull: ServedPull) -> list:
        """cuda-ipc: the whole pull in one message; the pull then waits for the client's "done" (see _on_done)."""
        return self._cutter.describe_device(pull)

    def _on_done(self, identity: bytes, h: dict) -> None:
        """cuda-ipc, nixl from GPU KV or straight into the client's blocks: the client copied (its READs ended);
        whether the transfer was held all along (a release meanwhile may have let its blocks be reused under the
        copy). A pull read on the device is counted now (its bytes were not as they were described)."""
        pull = self._confirming.pop((identity, h.get("nonce")), None)
        if pull is None:
            nonce = h.get("nonce")
            return self._control.send_error(identity, nonce if isinstance(nonce, str) else None, "unknown",
                                            "no pull read on the device waits for this confirmation; recompute the "
                                            "prefill")
        held = self._ledger.still_held(pull.allowed)
        if self._reads_device(pull.path):
            self._ledger.count(num_bytes_sent=pull.num_bytes, num_blocks_sent=len(pull.block_ids))
        self._control.send_control(identity, {"k": "done", "nonce": pull.nonce, "ok": held})
        if held:
            self._finish(pull)

    def _finish(self, pull: ServedPull) -> None:
        # Timed to the last message handed to zmq: at most `window` messages are still on the wire.
        seconds = time.monotonic() - pull.started
        self._ledger.count(num_transfers_served=1)
        logger.debug("transfer %s: sent %d blocks, %d bytes in %.4f s", pull.transfer_id,
                     len(pull.block_ids), pull.num_bytes, seconds)
        if self.on_pull is not None:
            try:
                self.on_pull(pull.transfer_id, pull.traceparent, len(pull.block_ids), pull.num_bytes, seconds, pull.path)
            except Exception:
                logger.exception("transfer %s: on_pull callback failed", pull.transfer_id)

    def _reap(self, now: float) -> None:
        for key in [k for k, p in self._confirming.items() if now > p.deadline]:
            del self._confirming[key]  # the client never confirmed its copy: nothing more to do for it
        for pull in [p for p in self._pulls if now > p.deadline]:
            self._pulls.remove(pull)
            logger.warning("transfer %s: client stopped taking batches (%d of %d sent); dropped the pull",
                           pull.transfer_id, pull.next_index, len(pull.block_ids))
            if pull.stream is not None:
                self._drop_stream(pull.stream, "its client stopped reading")
        if self._streams is not None:
            self._streams.expire_pending(now)
        for tid in self._ledger.forget_expired():
            logger.warning("transfer %s: never released, forgotten %.0f s after its lease expired",
                           tid, FORGET_EXPIRED_AFTER_S)


