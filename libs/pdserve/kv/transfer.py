"""KV block transfer over ZeroMQ: a ROUTER endpoint on the prefill side, a DEALER client on the decode side.

Wire protocol (version 1); every message starts with an orjson header frame.
  client -> endpoint  {"op": "pull", v, nonce, transfer_id, token, block_ids, segment_nbytes, layout_tag,
                       traceparent, window, timeout_s}
                      {"op": "credit", nonce, n}     n more messages may be sent
  endpoint -> client  {"k": "data", nonce, i, c, h} + frames: the next bytes of the batch of blocks i..i+c-1
                       of the pull (pool.BatchStream order); h, on the batch's last message only, is the
                       list of xxh3_64 checksums of the batch, one per segment index (pool.segment_checksums)
                      {"k": "error", nonce, reason, message}
The pull is served in batches of `batch_blocks` blocks, each cut into messages of about 2 MiB: large pieces
of pool memory go as zero-copy frames, small ones are joined. Flow control is credit based, per message:
the pull grants `window` messages and each message written into place grants one more, so the endpoint
streams back-to-back while at most window x 2 MiB per pull is queued anywhere. The receiver copies each
frame into place as it arrives (its one copy) and checks the batch's checksums at its end.
A pull may name any subset of the block ids allowed for its transfer, in any order. After release()
returns, no message of that transfer is cut from pool memory any more (a pull in progress is refused at its
next message); messages already queued zero-copy are read by the kernel later, but their checksums were
taken when they were cut, so a block reused meanwhile fails the decode side's check instead of arriving
silently wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import hmac
import logging
import math
import platform
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import orjson
import zmq

from pdserve.kv.pool import BatchStream, BlockPool
from pdserve.throttled_log import ThrottledLog, clip

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
REFUSAL_REASONS = frozenset({"unknown", "released", "expired", "bad_token", "bad_block", "busy"})
_POLL_MS = 100  # the endpoint's idle wake-up: how prompt stop() is, and the only cost of an idle endpoint
_CLIENT_POLL_S = 0.05  # how often a waiting pull notices cancellation or close()
_MAX_WINDOW = 64  # messages of ~2 MiB one pull may have queued: 128 MiB, far above what a link needs
# Bounds on what one peer can make the endpoint hold: pulls at once per connection (the client opens one
# connection per pull in flight) and in all, and messages queued for a connection (what credit allows those
# pulls, plus room for refusals; a peer that stops reading gets no more once it is full).
_MAX_PULLS_PER_PEER = 4
_MAX_PULLS = 1024
_SEND_QUEUE_MESSAGES = _MAX_PULLS_PER_PEER * _MAX_WINDOW + 64
# zmq hands over only whole messages: messages of this size let the receiver copy one while the next
# arrives; much smaller ones cost per-message overhead, larger ones stall the pipeline (measured).
_MESSAGE_NBYTES = 2 << 20
_MIN_SPAN_NBYTES = 768 << 10  # see default_batch_blocks()
_MAX_IDLE_SOCKETS_PER_ADDRESS = 4
# Pieces of pool memory at least this large go as zero-copy frames; smaller runs are joined into one frame,
# since each zero-copy frame costs pyzmq a hand-off to its garbage-collector thread (measured).
_ZERO_COPY_MIN_NBYTES = 64 << 10
_FORGET_EXPIRED_AFTER_S = 600.0  # an allowed transfer nobody released is dropped this long after expiry
_REMEMBER_GONE = 4096  # released/expired ids kept so late pulls get the precise reason


class TransferError(Exception):
    """A KV transfer failed; the message names the cause and the fix. Decode falls back to recompute."""


class TransferRefused(TransferError):
    """The endpoint would not serve the pull; `.reason` is one of REFUSAL_REASONS."""

    _DEFAULT_MESSAGES = {
        "unknown": "the transfer is unknown to the endpoint; check the address and transfer_id",
        "released": "the transfer was already released by the prefill side; pull before releasing",
        "expired": "the transfer's lease expired; pull sooner or lengthen the prefill lease",
        "bad_token": "wrong or missing token; pass the token from the same KV-ready message",
        "bad_block": "block ids outside the transfer's allowed set; pull only the block_ids that were allowed",
        "busy": "the endpoint serves its limit of pulls at once; retry, or recompute the prefill",
    }

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"{reason}: {self._DEFAULT_MESSAGES.get(reason, 'refused')}")


class TransferTimeout(TransferError):
    """No (complete) answer within timeout_s: the endpoint is stalled, gone or unreachable."""


class TransferIntegrityError(TransferError):
    """A block's checksum did not match the bytes that arrived."""


class LayoutMismatch(TransferError):
    """The two pools disagree on segment sizes, segment count or layout tag."""


@dataclass(frozen=True)
class TransferResult:
    num_blocks: int
    num_bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Throughput in gigabytes (1e9 bytes) per second, not gigabits."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def describe_layout(segment_nbytes: Sequence[int], layout_tag: str) -> str:
    sizes = tuple(segment_nbytes)
    if sizes and len(set(sizes)) == 1:
        shown = f"{len(sizes)} segment(s) of {sizes[0]} B"
    else:
        shown = f"segments {sizes}"
    return f"{shown} per block, layout_tag={layout_tag!r}"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_malloc_tuned = False


def tune_malloc_for_transfers(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc reuse freed memory instead of returning it to the kernel at once.

    zmq allocates a fresh buffer for every received message, and coalescing small segments allocates one per
    frame. With glibc's defaults (blocks above 128 KiB mmap'ed, more than 128 KiB free at the heap top trimmed)
    each of those buffers is page-faulted in anew: measured on loopback, that halved the transport's
    throughput. Process-wide and idempotent; a no-op where the C library is not glibc. Returns whether it is
    in effect.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                         and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    logger.info("glibc malloc tuned for KV transfers (mmap threshold %d B, trim threshold %d B): %s",
                mmap_threshold, trim_threshold, _malloc_tuned)
    return _malloc_tuned


# ---------------------------------------------------------------------------------------------- endpoint


@dataclass
class _Allowed:
    token: bytes
    block_ids: frozenset[int]
    expires_at: float
    released: bool = False


@dataclass
class _Pull:
    identity: bytes
    nonce: str
    transfer_id: str
    allowed: _Allowed
    block_ids: list[int]
    traceparent: str | None
    credit: int  # messages the client will still take
    deadline: float  # monotonic; past it the client has stopped granting credit and is gone
    started: float = field(default_factory=time.monotonic)
    batch: BatchStream | None = None  # the batch being sent
    batch_first: int = 0  # its first position in block_ids
    next_index: int = 0  # first position of the next batch
    num_bytes: int = 0


class _BadRequest(Exception):
    pass


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
    seconds) is called on the serving thread after each pull served; keep it short.
    tune_malloc: see tune_malloc_for_transfers().
    """

    def __init__(
        self,
        pool: BlockPool,
        *,
        bind_host: str = "0.0.0.0",
        advertise_host: str = "127.0.0.1",
        batch_blocks: int | None = None,
        io_threads: int = 1,
        on_pull: Callable[[str, str | None, int, int, float], None] | None = None,
        tune_malloc: bool = True,
    ) -> None:
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
        self._lock = threading.Lock()
        self._cutting = threading.Lock()  # held while a message is cut from pool memory; see release()
        self._allowed: dict[str, _Allowed] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stats = dict(num_blocks_sent=0, num_bytes_sent=0, num_transfers_served=0, num_transfers_refused=0)
        self._pulls: list[_Pull] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._address: str | None = None
        self._paused_until = 0.0
        self._corrupt_next = False
        self._complaints = ThrottledLog(logger)  # refusals and bad requests: a peer decides how many
        # A pull request names each block once at most (a few bytes each) and a few fields: anything much larger is
        # not a pull; zmq drops the connection of a peer that sends it, before it is held in memory.
        self.max_request_nbytes = 64 * 1024 + 12 * (pool.num_blocks + len(pool.segment_nbytes))

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
            tune_malloc_for_transfers()
        self._ctx = zmq.Context(self._io_threads)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1  # a vanished client raises EHOSTUNREACH instead of silently eating batches
        # Credit bounds the data queued per pull (and a peer's pulls are bounded), so a well-behaved peer never
        # reaches this; one that sends requests and never reads finds its queue full and gets nothing more.
        sock.sndhwm = _SEND_QUEUE_MESSAGES
        sock.maxmsgsize = self.max_request_nbytes
        if ":" in self.bind_host:
            sock.ipv6 = True
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        sock.bind(f"tcp://{host}:0")
        port = int(sock.last_endpoint.decode().rsplit(":", 1)[1])
        adv = f"[{self.advertise_host}]" if ":" in self.advertise_host else self.advertise_host
        self._address = f"tcp://{adv}:{port}"
        self._coalesce_below = max(_ZERO_COPY_MIN_NBYTES, sock.copy_threshold)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"kv-endpoint-{port}", daemon=True)
        self._thread.start()
        logger.info("kv transfer endpoint serving on %s (bound %s:%d)", self._address, self.bind_host, port)

    def stop(self) -> None:
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            logger.error("kv transfer endpoint %s: serving thread did not stop within 5 s", self._address)
            return  # closing a socket another thread still uses would crash; the thread is a daemon
        self._sock.close(linger=0)
        self._ctx.term()
        logger.info("kv transfer endpoint %s stopped", self._address)

    # ---- book-keeping (any thread)

    def allow(self, transfer_id: str, token: str, block_ids: Sequence[int], expires_at: float) -> None:
        """Let a pull presenting `token` read `block_ids` until `expires_at` (time.time() based)."""
        bad = [b for b in block_ids if not 0 <= b < self.pool.num_blocks]
        if bad:
            raise ValueError(f"transfer {transfer_id}: block ids {bad[:8]} outside the pool of {self.pool.num_blocks}")
        if not token:
            raise ValueError(f"transfer {transfer_id}: an empty token would let anyone read the blocks")
        with self._lock:
            if transfer_id in self._allowed:
                raise ValueError(f"transfer {transfer_id} is already allowed; transfer ids must be unique")
            self._gone.pop(transfer_id, None)
            self._allowed[transfer_id] = _Allowed(token.encode(), frozenset(block_ids), expires_at)

    def release(self, transfer_id: str) -> bool:
        """Forget the transfer: later pulls are refused ("released"), one in progress at its next message.
        Once this returns, the endpoint reads none of the transfer's blocks again (the caller may reuse
        them). Returns False if it was unknown or already released."""
        with self._lock:
            allowed = self._allowed.pop(transfer_id, None)
            if allowed is None:
                return False
            allowed.released = True
            self._remember_gone(transfer_id, "released")
        with self._cutting:  # a message being cut right now may still read the blocks: wait for it
            pass
        return True

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, num_transfers_allowed=len(self._allowed))

    def _remember_gone(self, transfer_id: str, reason: str) -> None:
        self._gone[transfer_id] = reason
        while len(self._gone) > _REMEMBER_GONE:
            self._gone.popitem(last=False)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v

    # ---- test hooks

    def pause_for_tests(self, seconds: float) -> None:
        """Test hook: the serving thread neither reads nor sends for `seconds` (a stalled prefill)."""
        self._paused_until = time.monotonic() + seconds

    def _corrupt_next_send_for_tests(self) -> None:
        """Test hook: flip a byte of the next message sent, after its blocks' checksums were fed."""
        self._corrupt_next = True

    # ---- serving thread

    def _serve(self) -> None:
        next_reap = 0.0
        while not self._stopping.is_set():
            ready = any(p.credit > 0 for p in self._pulls)
            try:
                readable = self._sock.poll(0 if ready else _POLL_MS)
                if self._paused_until > time.monotonic():  # checked after poll: pausing may race with it
                    self._stopping.wait(min(self._paused_until - time.monotonic(), _POLL_MS / 1000))
                    continue
                if readable:
                    self._receive_all()
                self._send_round()
            except Exception:  # one bad message or peer must not take the endpoint down
                logger.exception("kv transfer endpoint %s: unexpected error in serving loop", self._address)
            now = time.monotonic()
            if now >= next_reap:
                self._reap(now)
                next_reap = now + 1.0

    def _receive_all(self) -> None:
        for _ in range(256):  # bounded, so sending is never starved by a flood of requests
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._complaints.warning("kv transfer endpoint: dropped a message of %d frames", len(frames))
                continue
            identity, raw = frames
            header = None
            try:
                header = orjson.loads(raw)
                if not isinstance(header, dict):
                    raise _BadRequest("header is not an object")
                op = header.get("op")
                if op == "pull":
                    self._on_pull_request(identity, header)
                elif op == "credit":
                    self._on_credit(identity, header)
                else:
                    raise _BadRequest(f"unknown op {op!r}")
            except (orjson.JSONDecodeError, _BadRequest, KeyError, TypeError, ValueError) as e:
                nonce = header.get("nonce") if isinstance(header, dict) else None
                tid = header.get("transfer_id") if isinstance(header, dict) else None
                self._complaints.warning("transfer %s: bad request from peer: %s", clip(tid), clip(e))
                self._count(num_transfers_refused=1)
                self._send_error(identity, nonce if isinstance(nonce, str) else None, "bad_request",
                                 f"malformed pull request ({clip(e)}); client and endpoint must run the same pdserve "
                                 "version")

    def _on_pull_request(self, identity: bytes, h: dict) -> None:
        if h.get("v") != PROTOCOL_VERSION:
            raise _BadRequest(f"protocol version {h.get('v')!r}, endpoint speaks {PROTOCOL_VERSION}")
        nonce, tid, token = h["nonce"], h["transfer_id"], h.get("token") or ""
        block_ids, segment_nbytes, layout_tag = h["block_ids"], h["segment_nbytes"], h["layout_tag"]
        if not (isinstance(nonce, str) and isinstance(tid, str) and isinstance(token, str)
                and isinstance(layout_tag, str) and isinstance(block_ids, list) and block_ids
                and all(type(b) is int for b in block_ids)
                and isinstance(segment_nbytes, list) and all(type(s) is int for s in segment_nbytes)):
            raise _BadRequest("fields of the wrong type, or no block ids")
        window = min(max(int(h.get("window", 2)), 1), _MAX_WINDOW)
        timeout_s = min(max(float(h.get("timeout_s", 60.0)), 0.0), 3600.0)
        if len(nonce) > 64 or len(tid) > 256 or len(token) > 256:
            raise _BadRequest("nonce, transfer_id or token longer than any pdserve sends")
        if len(self._pulls) >= _MAX_PULLS or sum(p.identity == identity for p in self._pulls) >= _MAX_PULLS_PER_PEER:
            return self._refuse(identity, nonce, tid, "busy", f"transfer {tid}: the endpoint serves its limit of pulls "
                                f"({_MAX_PULLS_PER_PEER} per connection, {_MAX_PULLS} in all); retry or recompute")

        with self._lock:
            allowed = self._allowed.get(tid)
            gone = self._gone.get(tid)
        if allowed is None:
            reason = gone or "unknown"
            why = {"unknown": "it was never allowed here (wrong address, or the prefill worker restarted)",
                   "released": "the prefill side already released it (pulled, cancelled, or lease ended)",
                   "expired": "its lease expired and the prefill side forgot it"}[reason]
            return self._refuse(identity, nonce, tid, reason, f"transfer {tid}: {why}; recompute the prefill")
        if not hmac.compare_digest(allowed.token, token.encode()):
            return self._refuse(identity, nonce, tid, "bad_token",
                                f"transfer {tid}: wrong or missing token; pass the token from its KV-ready message")
        if time.time() > allowed.expires_at:
            late = time.time() - allowed.expires_at
            return self._refuse(identity, nonce, tid, "expired",
                                f"transfer {tid}: lease expired {late:.3f} s ago; pull before lease_expires_at "
                                "or lengthen the prefill lease")
        if tuple(segment_nbytes) != self.pool.segment_nbytes or layout_tag != self.pool.layout_tag:
            msg = (f"transfer {tid}: prefill has {describe_layout(self.pool.segment_nbytes, self.pool.layout_tag)}, "
                   f"decode has {describe_layout(segment_nbytes, layout_tag)}; "
                   "both sides must run the same model, dtype and block size")
            return self._refuse(identity, nonce, tid, "layout", msg)
        outside = [b for b in block_ids if b not in allowed.block_ids]
        if outside:
            return self._refuse(identity, nonce, tid, "bad_block",
                                f"transfer {tid}: block ids {outside[:8]} were not allowed for it; "
                                "pull only the block_ids from its KV-ready message")
        tp = h.get("traceparent")
        pull = _Pull(identity, nonce, tid, allowed, block_ids, tp if isinstance(tp, str) else None, window,
                     deadline=time.monotonic() + timeout_s + 5.0)
        self._pulls.append(pull)
        logger.debug("transfer %s: serving %d blocks (traceparent %s)", tid, len(block_ids), pull.traceparent)

    def _on_credit(self, identity: bytes, h: dict) -> None:
        for p in self._pulls:
            if p.identity == identity and p.nonce == h["nonce"]:
                p.credit += int(h.get("n", 1))
                return  # credit for a pull we dropped is harmless

    def _refuse(self, identity: bytes, nonce: str, tid: str, reason: str, message: str) -> None:
        self._complaints.warning("transfer %s: refused (%s): %s", clip(tid), reason, clip(message, 400))
        self._count(num_transfers_refused=1)
        self._send_error(identity, nonce, reason, message)

    def _send_error(self, identity: bytes, nonce: str | None, reason: str, message: str) -> None:
        header = orjson.dumps({"k": "error", "nonce": nonce, "reason": reason, "message": clip(message, 1000)})
        try:
            self._sock.send_multipart([identity, header], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the peer left, or does not read what it asked for: nobody takes this answer
            logger.debug("could not deliver refusal %s: %s", reason, e)

    def _send_round(self) -> None:
        """One message for each pull that has credit: pulls in flight share the link message by message."""
        for pull in list(self._pulls):
            if pull.credit <= 0:
                continue
            try:
                with self._cutting:
                    if pull.allowed.released:
                        self._pulls.remove(pull)
                        self._refuse(pull.identity, pull.nonce, pull.transfer_id, "released",
                                     f"transfer {pull.transfer_id}: released by the prefill side during the pull; "
                                     "recompute the prefill")
                        continue
                    message = self._cut_message(pull)
                self._sock.send_multipart(message, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:
                self._pulls.remove(pull)
                logger.warning("transfer %s: client went away mid-pull (%s); dropped", pull.transfer_id, e)
                continue
            except Exception as e:  # e.g. the pool failed: drop this pull, or the loop would retry it forever
                self._pulls.remove(pull)
                logger.exception("transfer %s: serving failed; pull dropped", pull.transfer_id)
                self._refuse(pull.identity, pull.nonce, pull.transfer_id, "internal",
                             f"transfer {pull.transfer_id}: the prefill endpoint failed while sending ({e!r}); "
                             "see its log, and recompute the prefill")
                continue
            if pull.batch is None and pull.next_index == len(pull.block_ids):
                self._pulls.remove(pull)
                self._finish(pull)

    def _cut_message(self, pull: _Pull) -> list:
        """The pull's next message, [identity, header, *frames], its checksums fed from pool memory now."""
        if pull.batch is None:
            ids = pull.block_ids[pull.next_index:pull.next_index + self.batch_blocks]
            pull.batch, pull.batch_first = BatchStream(self.pool, ids), pull.next_index
            pull.next_index += len(ids)
        batch = pull.batch
        frames: list = []
        small: list[memoryview] = []  # runs of small pieces are joined: zmq would copy each one, slower
        small_nbytes = 0
        for view in batch.walk(min(_MESSAGE_NBYTES, batch.nbytes_left)):
            if view.nbytes >= self._coalesce_below:
                if small:
                    frames.append(b"".join(small))
                    small, small_nbytes = [], 0
                frames.append(view)
            else:
                small.append(view)
                small_nbytes += view.nbytes
                if small_nbytes >= self._coalesce_below:
                    frames.append(b"".join(small))
                    small, small_nbytes = [], 0
        if small:
            frames.append(b"".join(small))
        if self._corrupt_next:  # after the checksums were fed from pool memory
            self._corrupt_next = False
            bad = bytearray(frames[0])
            bad[0] ^= 0xFF
            frames[0] = bytes(bad)
        last = batch.nbytes_left == 0
        header = orjson.dumps({"k": "data", "nonce": pull.nonce, "i": pull.batch_first, "c": batch.num_blocks,
                               "h": batch.checksums() if last else None})
        nbytes = sum(memoryview(f).nbytes for f in frames)
        pull.num_bytes += nbytes
        pull.credit -= 1
        if last:
            pull.batch = None
        self._count(num_bytes_sent=nbytes, num_blocks_sent=batch.num_blocks if last else 0)
        return [pull.identity, header, *frames]

    def _finish(self, pull: _Pull) -> None:
        # Timed to the last message handed to zmq: at most `window` messages are still on the wire.
        seconds = time.monotonic() - pull.started
        self._count(num_transfers_served=1)
        logger.debug("transfer %s: sent %d blocks, %d bytes in %.4f s", pull.transfer_id,
                     len(pull.block_ids), pull.num_bytes, seconds)
        if self.on_pull is not None:
            try:
                self.on_pull(pull.transfer_id, pull.traceparent, len(pull.block_ids), pull.num_bytes, seconds)
            except Exception:
                logger.exception("transfer %s: on_pull callback failed", pull.transfer_id)

    def _reap(self, now: float) -> None:
        for pull in [p for p in self._pulls if now > p.deadline]:
            self._pulls.remove(pull)
            logger.warning("transfer %s: client stopped taking batches (%d of %d sent); dropped the pull",
                           pull.transfer_id, pull.next_index, len(pull.block_ids))
        wall = time.time()
        with self._lock:
            stale = [t for t, a in self._allowed.items() if wall > a.expires_at + _FORGET_EXPIRED_AFTER_S]
            for tid in stale:
                del self._allowed[tid]
                self._remember_gone(tid, "expired")
        for tid in stale:
            logger.warning("transfer %s: never released, forgotten %.0f s after its lease expired",
                           tid, _FORGET_EXPIRED_AFTER_S)


# ---------------------------------------------------------------------------------------------- client


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

    def was_dropped(self) -> bool:
        """Whether the endpoint dropped the connection since the last look."""
        try:
            self.monitor.recv_multipart(zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
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
                 tune_malloc: bool = True) -> None:
        if tune_malloc:
            tune_malloc_for_transfers()
        self._ctx = zmq.Context(io_threads)
        self._executor = ThreadPoolExecutor(max_concurrent_pulls, thread_name_prefix="kv-pull")
        self._window = min(max(window_messages, 1), _MAX_WINDOW)
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
    ) -> TransferResult:
        """Copy remote blocks into local ones (remote_block_ids[i] -> local_block_ids[i]) within timeout_s.

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
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._pull_blocking, address, transfer_id, token, list(remote_block_ids), pool,
            list(local_block_ids), timeout_s, deadline, traceparent, cancel)
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

    def _pull_blocking(self, address, transfer_id, token, remote_ids, pool, local_ids, timeout_s, deadline,
                       traceparent, cancel) -> TransferResult:
        started = time.monotonic()
        nonce = secrets.token_hex(8)
        request = orjson.dumps({
            "v": PROTOCOL_VERSION, "op": "pull", "nonce": nonce, "transfer_id": transfer_id, "token": token,
            "block_ids": remote_ids, "segment_nbytes": list(pool.segment_nbytes), "layout_tag": pool.layout_tag,
            "traceparent": traceparent, "window": self._window, "timeout_s": timeout_s,
        })
        block_nbytes = sum(pool.segment_nbytes)
        num_blocks = len(remote_ids)
        received = 0
        conn = self._checkout(address, transfer_id)
        sock = conn.sock
        clean = False
        try:
            sock.send(request, zmq.NOBLOCK)  # queued on the connecting pipe; nothing blocks here
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
                    if header.get("k") != "data" or first != received or not isinstance(count, int) or not (
                            0 < count <= num_blocks - received):
                        raise ValueError(f"unexpected header {str(header)[:200]}")
                    if batch is None:
                        batch = BatchStream(pool, local_ids[first:first + count])
                    for frame in frames[1:]:
                        src, offset = frame.buffer, 0
                        for dst in batch.walk(src.nbytes):
                            dst[:] = src if dst.nbytes == src.nbytes else src[offset:offset + dst.nbytes]
                            offset += dst.nbytes
                    if checksums is not None:
                        if batch.nbytes_left or not isinstance(checksums, list) or len(checksums) != len(
                                pool.segment_nbytes):
                            raise ValueError(f"batch of blocks {first}.. ended early or with a bad checksum list")
                        bad = [k for k, (got, want) in enumerate(zip(batch.checksums(), checksums)) if got != want]
                        if bad:
                            raise TransferIntegrityError(
                                f"transfer {transfer_id}: blocks {first}..{first + count - 1} (local ids "
                                f"{local_ids[first]}..) from {address} failed their xxh3 checksum in segment "
                                f"{bad[0]} ({len(bad)} of {len(checksums)} segments bad): the bytes changed in flight "
                                "or the prefill side reused a block before the pull finished; recompute the prefill")
                        batch, received = None, received + count
                except ValueError as e:
                    raise TransferError(f"transfer {transfer_id}: malformed reply from {address} ({e}); both sides "
                                        "must run the same pdserve version") from e
                owed += 1
                if received < num_blocks and owed >= credit_every:
                    sock.send(orjson.dumps({"op": "credit", "nonce": nonce, "n": owed}), zmq.NOBLOCK)
                    owed = 0
            clean = True
        except _Cancelled:
            raise TransferError(f"transfer {transfer_id}: pull cancelled after {received} of {num_blocks} blocks")
        finally:
            if clean:
                self._checkin(conn)
            else:
                conn.close()
        seconds = time.monotonic() - started
        result = TransferResult(num_blocks, num_blocks * block_nbytes, seconds)
        logger.debug("transfer %s: pulled %d blocks, %d bytes in %.4f s (%.2f GB/s)", transfer_id, num_blocks,
                     result.num_bytes, seconds, result.gbps)
        return result

    def _receive(self, conn: _Connection, deadline, cancel, transfer_id, received, num_blocks, timeout_s) -> list:
        address = conn.address
        while True:
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
            # Data first, without a poll when it is already there (the common case while a pull streams);
            # the monitor is looked at only between waits, so a dropped connection fails the pull within
            # one _CLIENT_POLL_S, and what arrived before the drop is still read.
            with contextlib.suppress(zmq.Again):
                return conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            if conn.was_dropped():
                raise TransferError(
                    f"transfer {transfer_id}: the prefill endpoint {address} closed the connection after {received} "
                    f"of {num_blocks} blocks (its process stopped or died); recompute the prefill")
            conn.sock.poll(max(1, math.ceil(min(left, _CLIENT_POLL_S) * 1000)))

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
