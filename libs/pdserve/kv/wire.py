"""The KV transfer's wire protocol (version 1) over ZeroMQ, and what both ends of it tune.

Every message starts with an orjson header frame.
  client -> endpoint  {"op": "pull", v, nonce, transfer_id, token, block_ids, segment_nbytes, layout_tag,
                       traceparent, window, timeout_s, path[, stream][, nixl_agent]}
                      {"op": "credit", nonce, n}     n more messages may be sent
  endpoint -> client  path "tcp": {"k": "data", nonce, i, c, h} + frames: the next bytes of the batch of blocks
                       i..i+c-1 of the pull (pool.BatchStream order); h, on the batch's last message only, is the
                       list of xxh3_64 checksums of the batch, one per segment index (pool.segment_checksums)
                      path "shm": {"k": "shm", nonce, i, c, pid, iov, h}: no bytes, but where the batch lies in
                       the endpoint's memory (process `pid`, iov: [address, length] in BatchStream order), and
                       its checksums; the client copies it with process_vm_readv (shm.py) and checks them
                      path "nixl": {"k": "nixl", nonce, i, c, pid, iov, h, agent[, md]}: the shm description, for a
                       NIXL READ (nixl_path.py): `agent` names the endpoint's NIXL agent, `md` (base64, first
                       description of a pull whose request did not name that agent as known) is its metadata
                      path "nixl" from GPU KV: {"k": "nixl", nonce, i, c, iov, agent, mem: "VRAM", dev[, md]}: device
                       pieces of GPU `dev` (nixl_path.device_iov), no checksums; the client then sends {"op":
                       "done", nonce} and is answered {"k": "done", nonce, ok}, as on cuda-ipc
                      {"k": "error", nonce, reason, message}
The pull is served in batches of blocks. On tcp each batch is cut into messages of about 2 MiB: large pieces
of pool memory go as zero-copy frames, small ones are joined; on shm each batch is one message. Flow control
is credit based, per message: the pull grants `window` messages and each message landed grants one more, so
the endpoint streams back-to-back while at most `window` messages per pull are queued anywhere.
A pull may name any subset of the block ids allowed for its transfer, in any order. After release() returns,
no message of that transfer is cut from pool memory any more (a pull in progress is refused at its next
message); bytes already described or queued zero-copy are read later, but their checksums were taken when
they were cut, so a block reused meanwhile fails the decode side's check instead of arriving silently wrong.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PATHS = ("tcp", "shm", "cuda-ipc", "nixl")  # the ways a pull's bytes can go; counted per worker as num_kv_pulls_<path>
POLL_MS = 100  # the endpoint's idle wake-up: how prompt stop() is, and the only cost of an idle endpoint
CLIENT_POLL_S = 0.05  # how often a waiting pull notices cancellation, close() or a dropped connection
MAX_WINDOW = 64  # messages one pull may have queued: 128 MiB on tcp, far above what a link needs
# Bounds on what one peer can make the endpoint hold: pulls at once per connection (the client opens one
# connection per pull in flight) and in all, and messages queued for a connection (what credit allows those
# pulls, plus room for refusals; a peer that stops reading gets no more once it is full).
MAX_PULLS_PER_PEER = 4
MAX_PULLS = 1024
SEND_QUEUE_MESSAGES = MAX_PULLS_PER_PEER * MAX_WINDOW + 64
# zmq hands over only whole messages: messages of this size let the receiver copy one while the next
# arrives; much smaller ones cost per-message overhead, larger ones stall the pipeline (measured).
MESSAGE_NBYTES = 2 << 20
# Pieces of pool memory at least this large go as zero-copy frames; smaller runs are joined into one frame,
# since each zero-copy frame costs pyzmq a hand-off to its garbage-collector thread (measured).
ZERO_COPY_MIN_NBYTES = 64 << 10


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
