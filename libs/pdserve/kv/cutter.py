"""How a pull's blocks leave the prefill side's pool: cut into ZeroMQ frame messages, byte-stream chunks (stream.py),
shm or nixl descriptions of where they lie in this process (shm.py, nixl_path.py) or one cuda-ipc description, each
host batch's checksums fed from pool memory as it is cut (GPU KV has none: its pulls end with the client's "done").

Kept apart from endpoint.py, which decides whom to serve and when (requests, leases, credit, the poll loop): a
Cutter only turns the next part of a ServedPull into bytes and counts them; it never sends, refuses or polls.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import orjson

from pdserve.kv import nixl_path, stream, wire
from pdserve.kv.ledger import Lease
from pdserve.kv.pool import BatchStream, BlockPool, batch_iov, batch_pieces, pieces_checksums


# nixl from GPU KV: one description covers this much of a pull, READ as one transfer into one landing buffer (a READ
# costs its post and its wait; the puller's landing memory bounds how many are in flight). nixl straight into the
# client's blocks too: 64 MiB in one READ ran at NIXL alone's rate here (UCX over TCP, 2 cores: 1.00-1.06x), 8 MiB
# READs, 4 in flight, at 0.88-0.96x.
DEVICE_BATCH_NBYTES = 64 << 20


@dataclass
class ServedPull:
    """One pull being served: whose (identity, nonce), what (the lease's blocks), how far, by which path."""

    identity: bytes
    nonce: str
    transfer_id: str
    allowed: Lease
    block_ids: list[int]
    traceparent: str | None
    credit: int  # messages the client will still take
    deadline: float  # monotonic; past it the client has stopped granting credit and is gone
    path: str = "tcp"  # how the bytes go: tcp frames, or shm / nixl descriptors (wire.py)
    stream: stream.Stream | None = None  # tcp: the plain TCP stream the bytes go on, where the client has one
    started: float = field(default_factory=time.monotonic)
    batch: BatchStream | None = None  # the batch being sent
    batch_first: int = 0  # its first position in block_ids
    next_index: int = 0  # first position of the next batch
    num_bytes: int = 0
    describe_extra: dict = field(default_factory=dict)  # nixl: fields for the next description (agent, metadata)
    # read where it lies, no checksums: the pull ends with the client's "done" (cuda-ipc, nixl from GPU KV, and
    # nixl READ straight into the client's blocks)
    confirms: bool = False


class Cutter:
    """`count(num_bytes_sent=, num_blocks_sent=)` is told of every part cut, as it is cut (the Ledger's count)."""

    def __init__(self, pool: BlockPool, batch_blocks: int, shm_batch_blocks: int,
                 count: Callable[..., None], direct_batch_blocks: int | None = None) -> None:
        self.pool = pool
        self.batch_blocks = batch_blocks  # tcp: blocks per batch, the unit of checksums
        self.shm_batch_blocks = shm_batch_blocks
        self.device_batch_blocks = max(1, DEVICE_BATCH_NBYTES // max(1, sum(pool.segment_nbytes)))
        self.direct_batch_blocks = direct_batch_blocks or self.device_batch_blocks
        self.gather_buffers = None  # nixl from GPU KV: nixl_gather.GatherBuffers, set by the endpoint
        self.count = count
        # Pieces below this are joined into one frame (zmq would copy each); TransferEndpoint.start() raises it to
        # its socket's copy threshold.
        self.coalesce_below = wire.ZERO_COPY_MIN_NBYTES
        self.corrupt_next = False  # test hook: flip a byte of the next part cut, after its checksums were fed
        self._ipc_description: list[dict] | None = None  # cuda-ipc: the KV tensors' IPC handles, made once
        # A staging pool (GPU KV) copies to the host when a pull over a host path starts, segment by segment.
        self._wait_out_segment = getattr(pool, "wait_out_segment", None)
        self._wait_out = getattr(pool, "wait_out", None)
        # Another process reads GPU KV in place (cuda-ipc, nixl): only once the engine's work that produced it ended.
        self._wait_produced = getattr(pool, "wait_produced", None)

    def start_batch(self, pull: ServedPull) -> None:
        """The pull's next batch of blocks as a BatchStream (tcp, frames or stream)."""
        ids = pull.block_ids[pull.next_index:pull.next_index + self.batch_blocks]
        before = functools.partial(self._wait_out_segment, ids) if self._wait_out_segment is not None else None
        pull.batch, pull.batch_first = BatchStream(self.pool, ids, before_segment=before), pull.next_index
        pull.next_index += len(ids)

    def corrupted(self, data) -> bytes:
        """Test hook's work: a copy of data with its first byte flipped (TransferEndpoint._corrupt_next_send_for_tests sets corrupt_next)."""
        self.corrupt_next = False
        bad = bytearray(data)
        bad[0] ^= 0xFF
        return bytes(bad)

    def cut_chunk(self, pull: ServedPull) -> None:
        """A stream pull's next chunk (stream.py's framing), each piece sent as it is cut where the socket takes
        it and queued otherwise. Each piece is checksummed once the socket took it (the walk hashes a view when
        the next is asked for): the kernel's copy just read it, so the hash reads cache, not memory."""
        s = pull.stream
        if pull.batch is None:
            self.start_batch(pull)
            s.send_or_queue(stream.BATCH_HEAD.pack(pull.batch_first, pull.batch.num_blocks))
        batch = pull.batch
        nbytes = min(stream.CHUNK_NBYTES, batch.nbytes_left)
        for view in batch.walk(nbytes):
            if self.corrupt_next:  # the walk hashes the view as it is; a changed copy goes out
                view = self.corrupted(view)
            s.send_or_queue(view)
        pull.num_bytes += nbytes
        last = batch.nbytes_left == 0
        # Counted before the trailer goes: once the client has it, the pull may have returned and stats() be read.
        self.count(num_bytes_sent=nbytes, num_blocks_sent=batch.num_blocks if last else 0)
        if last:
            s.send_or_queue(struct.pack(f"<{len(self.pool.segment_nbytes)}Q", *batch.checksums()))
            pull.batch = None

    def cut_frames(self, pull: ServedPull) -> list:
        """tcp as ZeroMQ frames: the pull's next message, [identity, header, *frames], its checksums fed from pool
        memory now."""
        if pull.batch is None:
            self.start_batch(pull)
        batch = pull.batch
        frames: list = []
        small: list[memoryview] = []  # runs of small pieces are joined: zmq would copy each one, slower
        small_nbytes = 0
        for view in batch.walk(min(wire.MESSAGE_NBYTES, batch.nbytes_left)):
            if view.nbytes >= self.coalesce_below:
                if small:
                    frames.append(b"".join(small))
                    small, small_nbytes = [], 0
                frames.append(view)
            else:
                small.append(view)
                small_nbytes += view.nbytes
                if small_nbytes >= self.coalesce_below:
                    frames.append(b"".join(small))
                    small, small_nbytes = [], 0
        if small:
            frames.append(b"".join(small))
        if self.corrupt_next:  # after the checksums were fed from pool memory
            frames[0] = self.corrupted(frames[0])
        last = batch.nbytes_left == 0
        header = orjson.dumps({"k": "data", "nonce": pull.nonce, "i": pull.batch_first, "c": batch.num_blocks,
                               "h": batch.checksums() if last else None})
        nbytes = sum(memoryview(f).nbytes for f in frames)
        pull.num_bytes += nbytes
        pull.credit -= 1
        if last:
            pull.batch = None
        self.count(num_bytes_sent=nbytes, num_blocks_sent=batch.num_blocks if last else 0)
        return [pull.identity, header, *frames]

    def describe_device(self, pull: ServedPull) -> list:
        """cuda-ipc: the whole pull in one message (the KV tensors' IPC handles and the blocks' rows); the pull
        then waits for the client's "done" (see TransferEndpoint._on_done)."""
        from pdserve.kv import cuda_ipc  # torch only where the pool is on a GPU

        if self._ipc_description is None:
            self._ipc_description = cuda_ipc.describe(self.pool.device_segments)
        if self._wait_produced is not None:
            self._wait_produced(pull.block_ids)
        pull.next_index = len(pull.block_ids)
        pull.num_bytes = len(pull.block_ids) * sum(self.pool.segment_nbytes)
        pull.credit -= 1
        header = orjson.dumps({"k": "cuda", "nonce": pull.nonce, "i": 0, "c": len(pull.block_ids),
                               "segments": self._ipc_description, "rows": pull.block_ids})
        return [pull.identity, header]

    def describe_batch(self, pull: ServedPull) -> list:
        """shm and nixl: the pull's next batch as where its pieces lie in this process, with their checksums taken
        now (plus the pull's describe_extra fields, which are sent once). A pull that confirms instead (nixl READ
        straight into the client's blocks) gets no checksums."""
        count = self.direct_batch_blocks if pull.confirms else self.shm_batch_blocks
        ids = pull.block_ids[pull.next_index:pull.next_index + count]
        first, pull.next_index = pull.next_index, pull.next_index + len(ids)
        if self._wait_out is not None:
            self._wait_out(ids)
        checks = {}
        if not pull.confirms:
            checksums = pieces_checksums(batch_pieces(self.pool, ids), len(self.pool.segment_nbytes))
            if self.corrupt_next:  # as if the bytes changed after they were described
                self.corrupt_next = False
                checksums[0] ^= 1
            checks = {"h": checksums}
        nbytes = len(ids) * sum(self.pool.segment_nbytes)
        header = orjson.dumps({"k": pull.path, "nonce": pull.nonce, "i": first, "c": len(ids), "pid": os.getpid(),
                               "iov": batch_iov(self.pool, ids).tolist(), **checks, **pull.describe_extra})
        pull.describe_extra = {k: v for k, v in pull.describe_extra.items() if k != "md"}
        pull.num_bytes += nbytes
        pull.credit -= 1
        self.count(num_bytes_sent=nbytes, num_blocks_sent=len(ids))
        return [pull.identity, header]

    def describe_device_batch(self, pull: ServedPull) -> list:
        """nixl from GPU KV: the pull's next batch gathered into one device buffer (nixl_gather.py) and described as
        that one piece, or where no buffer is free, as where its pieces lie (nixl_path.device_iov); no checksums.
        Counted, like a cuda-ipc pull, when the client confirms (TransferEndpoint._on_done)."""
        ids = pull.block_ids[pull.next_index:pull.next_index + self.device_batch_blocks]
        first, pull.next_index = pull.next_index, pull.next_index + len(ids)
        if self._wait_produced is not None:
            self._wait_produced(ids)
        nbytes = len(ids) * sum(self.pool.segment_nbytes)
        gathered = None
        if self.gather_buffers is not None and nbytes <= self.gather_buffers.nbytes:
            gathered = self.gather_buffers.gather(pull, self.pool.device_segments, ids)
        iov = [[gathered, nbytes]] if gathered is not None else nixl_path.device_iov(
            self.pool.device_segments, ids).tolist()
        header = orjson.dumps({"k": "nixl", "nonce": pull.nonce, "i": first, "c": len(ids), "iov": iov,
                               **pull.describe_extra})
        pull.describe_extra = {k: v for k, v in pull.describe_extra.items() if k != "md"}
        pull.num_bytes += nbytes
        pull.credit -= 1
        return [pull.identity, header]
