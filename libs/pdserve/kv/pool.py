"""Block pools (the memory that holds KV blocks, seen as raw byte segments) and the byte stream of a batch.

The transfer code moves bytes, not tensors: a block is one or more contiguous byte segments (one per layer,
or K and V halves, or the whole block), and both ends of a transfer must agree on the segment sizes and on a
free-text layout tag (model / dtype / block size). Views handed out are zero-copy: writing into them writes
into the engine's KV memory.
"""

from __future__ import annotations

import functools
import mmap
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import xxhash


@runtime_checkable
class BlockPool(Protocol):
    """Memory holding KV blocks. A block is one or more contiguous byte segments (e.g. one per layer, or K
    and V halves).

    Optional: segment_span(segment_index, first_row, num_rows) -> memoryview, segment k of a run of
    consecutive rows of the pool's memory as one view (ArrayBlockPool has it), which lets a run move as one
    large frame; and row_of(block_id) -> int, the row that holds a block where that is not the block id
    itself (a staging pool: vLLM's scattered block ids sit in consecutive staging slots). A staging pool may also
    overlap its copies with the transport: prepare_out(block_ids) / wait_out_segment(block_ids, k) /
    wait_out(block_ids) on the serving side, commit_segment(block_ids, k) on the pulling side (CudaStagingPool).
    """

    num_blocks: int
    segment_nbytes: tuple[int, ...]  # size of each segment of one block, same for every block
    layout_tag: str  # free text both ends compare (model/dtype/block size), e.g. from KVLayout

    def segments(self, block_id: int) -> list[memoryview]:
        """Writable, contiguous, 1-D uint8 ('B') views of block `block_id`'s segments, in order."""
        ...


def _as_uint8_rows(array, index: int) -> np.ndarray:
    """View `array` ([num_blocks, ...], C-contiguous) as uint8 [num_blocks, bytes_per_block] without a copy."""
    if not isinstance(array, np.ndarray) and hasattr(array, "untyped_storage"):  # a torch tensor
        if array.device.type != "cpu":
            raise ValueError(
                f"array {index} lives on {array.device}; ArrayBlockPool needs CPU memory "
                "(GPU KV goes through a CUDA-aware pool)"
            )
        if not array.is_contiguous():
            raise ValueError(f"array {index} is not contiguous; pass the engine's KV tensor itself, not a slice")
        import torch  # only reached when torch is installed: the argument is a tensor

        # Through uint8 first: numpy has no bfloat16, and reshape keeps the block axis whatever the dtype.
        array = array.detach().reshape(array.shape[0], -1).view(torch.uint8).numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array {index} is a {type(array).__name__}; pass numpy arrays or CPU torch tensors")
    if array.ndim < 1 or array.shape[0] == 0:
        raise ValueError(f"array {index} has shape {array.shape}; the first axis must be the block axis")
    if not array.flags.c_contiguous:
        raise ValueError(f"array {index} is not C-contiguous; a copy would not be the engine's KV memory")
    if not array.flags.writeable:
        raise ValueError(f"array {index} is read-only; received blocks could not be written into it")
    return array.reshape(array.shape[0], -1).view(np.uint8)


class ArrayBlockPool:
    """Backed by one or more numpy arrays or CPU torch tensors, each of shape [num_blocks, ...] and
    C-contiguous; block i's segments are arrays[k][i] for each k."""

    def __init__(self, arrays: Sequence, layout_tag: str = "") -> None:
        if len(arrays) == 0:
            raise ValueError("ArrayBlockPool needs at least one array")
        self._rows = [_as_uint8_rows(a, k) for k, a in enumerate(arrays)]
        counts = {rows.shape[0] for rows in self._rows}
        if len(counts) != 1:
            raise ValueError(f"arrays disagree on the number of blocks (first axis): {sorted(counts)}")
        self._arrays = list(arrays)  # keep the originals alive: the uint8 views may only borrow them
        self.num_blocks: int = counts.pop()
        self.segment_nbytes: tuple[int, ...] = tuple(int(rows.shape[1]) for rows in self._rows)
        self.layout_tag: str = layout_tag
        self._iov_table: np.ndarray | None = None

    @classmethod
    def zeros(cls, num_blocks: int, block_nbytes: int, layout_tag: str = "") -> ArrayBlockPool:
        """A pool of one uint8 array: one segment of `block_nbytes` per block, zero pages touched lazily.

        Anonymous memory without transparent huge pages: numpy asks for huge pages on large arrays, and on a
        busy machine each first touch of one can stall the process in the kernel's memory compaction (measured
        here: 0.1 GB/s first touch with huge pages on a fragmented machine, 1.7-2 GB/s without). A mock engine
        with a prefix cache touches its whole pool over time; such stalls froze its event loop past its
        heartbeats."""
        nbytes = max(1, num_blocks * block_nbytes)
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        rows = np.frombuffer(memory, dtype=np.uint8, count=num_blocks * block_nbytes).reshape(num_blocks, block_nbytes)
        return cls([rows], layout_tag)

    def segments(self, block_id: int) -> list[memoryview]:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} is outside this pool of {self.num_blocks} blocks")
        return [memoryview(rows[block_id]) for rows in self._rows]

    def segment_span(self, segment_index: int, first_block: int, num_blocks: int) -> memoryview:
        """Segment `segment_index` of blocks first_block .. first_block+num_blocks-1 as one contiguous view:
        rows of one array are adjacent, so a run of consecutive blocks moves as one large zero-copy frame.
        Optional for pools; the transfer falls back to segments() without it."""
        if not (0 <= first_block and num_blocks > 0 and first_block + num_blocks <= self.num_blocks):
            raise IndexError(f"blocks {first_block}..{first_block + num_blocks - 1} are outside the pool of "
                             f"{self.num_blocks}")
        return memoryview(self._rows[segment_index][first_block:first_block + num_blocks].reshape(-1))

    def segment_iov(self, block_ids: Sequence[int]) -> np.ndarray:
        """[address, length] of every segment of the blocks in this process's memory, segment-major (the order of
        batch_pieces), computed at once: the shm path describes a batch with it. Optional for pools."""
        if self._iov_table is None:  # per segment array: base address, row stride, row length
            self._iov_table = np.array([[rows.ctypes.data, rows.strides[0], rows.shape[1]] for rows in self._rows],
                                       dtype=np.uint64)
        bases, strides, lengths = self._iov_table[:, 0:1], self._iov_table[:, 1:2], self._iov_table[:, 2:3]
        rows = np.asarray(block_ids, dtype=np.uint64)[None, :]
        iov = np.empty((len(self._rows), rows.shape[1], 2), dtype=np.uint64)
        iov[:, :, 0] = bases + rows * strides
        iov[:, :, 1] = lengths
        return iov.reshape(-1, 2)

    def memory_regions(self) -> list[tuple[int, int]]:
        """[(address, nbytes)] of each array's memory in this process, for a transport that registers it once
        (nixl_path.py). Optional for pools."""
        return [(int(rows.ctypes.data), int(rows.nbytes)) for rows in self._rows]

    def read_blocks(self, block_ids: Sequence[int], out: np.ndarray, out_rows: Sequence[int]) -> None:
        """Copy each block into its row of out (uint8 [rows, block_nbytes]: a row holds a block's segments
        concatenated): one gather per segment array, whatever the number of blocks."""
        blocks, rows = np.asarray(block_ids, dtype=np.intp), np.asarray(out_rows, dtype=np.intp)
        offset = 0
        for seg in self._rows:
            out[rows, offset:offset + seg.shape[1]] = seg[blocks]
            offset += seg.shape[1]

    def write_blocks(self, block_ids: Sequence[int], data: np.ndarray, data_rows: Sequence[int]) -> None:
        """The inverse of read_blocks: rows of data into the blocks."""
        blocks, rows = np.asarray(block_ids, dtype=np.intp), np.asarray(data_rows, dtype=np.intp)
        offset = 0
        for seg in self._rows:
            seg[blocks] = data[rows, offset:offset + seg.shape[1]]
            offset += seg.shape[1]

    def block_bytes(self, block_id: int) -> bytes:
        """The block's segments concatenated (a copy; for tests and debugging)."""
        return b"".join(self.segments(block_id))

    @property
    def block_nbytes(self) -> int:
        return sum(self.segment_nbytes)

    def __repr__(self) -> str:
        return (
            f"ArrayBlockPool(num_blocks={self.num_blocks}, segment_nbytes={self.segment_nbytes}, "
            f"layout_tag={self.layout_tag!r})"
        )


# ---------------------------------------------------------------------------------------- batch streams


def segment_checksums(pool: BlockPool, block_ids: Sequence[int]) -> list[int]:
    """xxh3_64 of each segment index's bytes over the blocks, in order (segment k of every block, as if one
    byte string): what BatchStream.checksums() computes while it walks."""
    hashers = [xxhash.xxh3_64() for _ in pool.segment_nbytes]
    for b in block_ids:
        for h, seg in zip(hashers, pool.segments(b)):
            h.update(seg)
    return [h.intdigest() for h in hashers]


@functools.lru_cache(maxsize=None)
def _agrees_with_segments(cls: type, method: str) -> bool:
    """Whether cls has `method` (segment_span, segment_iov) from the same class as its segments(): a subclass that
    overrides only segments() (a staging pool, say) must not be read around through the parent's method."""
    def owner(name: str) -> type | None:
        return next((c for c in cls.__mro__ if name in vars(c)), None)
    return owner(method) is not None and owner(method) is owner("segments")


def _spans_agree_with_segments(cls: type) -> bool:
    return _agrees_with_segments(cls, "segment_span")


def batch_pieces(pool: BlockPool, block_ids: Sequence[int]) -> list[tuple[memoryview, int, range]]:
    """A batch's bytes in wire order, as (view, segment index, batch positions of the blocks it covers).

    The order is segment-major (segment 0 of every block, then segment 1, ...) so that, where the pool has
    segment_span(), a run of consecutive block ids is one large view per segment instead of one small view
    per block and segment. Each end cuts the same stream into its own pieces; only the order must agree.
    """
    span = pool.segment_span if _spans_agree_with_segments(type(pool)) else None
    row_of = getattr(pool, "row_of", None) or (lambda b: b)
    runs: list[list[int]] = []  # [first row, count, first batch position]
    for n, b in enumerate(block_ids):
        row = row_of(b)
        if span is not None and runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1][1] += 1
        else:
            runs.append([row, 1, n])
    if len(runs) < len(block_ids):
        return [(span(k, first, count), k, range(pos, pos + count))
                for k in range(len(pool.segment_nbytes)) for first, count, pos in runs]
    per_block = [pool.segments(b) for b in block_ids]
    return [(segments[k], k, range(n, n + 1))
            for k in range(len(pool.segment_nbytes)) for n, segments in enumerate(per_block)]


class BatchStream:
    """One batch of blocks as a byte stream over pool memory, walked front to back.

    The sender walks it to cut messages, the receiver to copy frames into place. The checksum unit is a
    segment index over the batch (segment k of every block of the batch, in order), not a block: the stream
    is segment-major, so each view the walk yields belongs to one segment index and is hashed whole, once
    the walk has passed it (still in cache). Per block it would be one hash call per block and segment:
    with 60 segments of 6 KiB per block that Python loop, not the socket, bounded the transfer.
    checksums() equals segment_checksums(pool, block_ids).

    before_segment(k): called before the walk yields the first bytes of segment k (a sender waits there for a
    staging copy of that segment); after_segment(k): once the walk has passed the last bytes of segment k (a
    receiver starts moving that segment on). Segment-major order makes each segment's bytes one stretch.
    """

    def __init__(self, pool: BlockPool, block_ids: Sequence[int], *,
                 before_segment: Callable[[int], None] | None = None,
                 after_segment: Callable[[int], None] | None = None) -> None:
        self._pieces = batch_pieces(pool, block_ids)
        self._segment_nbytes = pool.segment_nbytes
        self._hashers = [xxhash.xxh3_64() for _ in pool.segment_nbytes]
        self.num_blocks = len(block_ids)
        self.nbytes_left = len(block_ids) * sum(pool.segment_nbytes)
        self._index = self._pos = 0
        self._before_segment, self._after_segment = before_segment, after_segment
        self._entered: int | None = None

    def walk(self, nbytes: int) -> Iterator[memoryview]:
        """Views covering the next `nbytes` of the stream; each is checksummed once the caller asks for the
        next one (or the walk ends), so write into a view before moving on."""
        if nbytes > self.nbytes_left:
            raise ValueError(f"{nbytes} bytes offered, {self.nbytes_left} left in the batch")
        while nbytes > 0:
            view, segment_index, _ = self._pieces[self._index]
            if self._before_segment is not None and segment_index != self._entered:
                self._entered = segment_index
                self._before_segment(segment_index)
            take = min(view.nbytes - self._pos, nbytes)
            part = view if take == view.nbytes else view[self._pos:self._pos + take]
            yield part
            self._hashers[segment_index].update(part)
            self._pos += take
            nbytes -= take
            self.nbytes_left -= take
            if self._pos == view.nbytes:
                self._index, self._pos = self._index + 1, 0
                if self._after_segment is not None and (
                        self._index == len(self._pieces) or self._pieces[self._index][1] != segment_index):
                    self._after_segment(segment_index)

    def checksums(self) -> list[int]:
        """One xxh3_64 per segment index of the pool."""
        assert self.nbytes_left == 0, "checksums of a batch walked only in part"
        return [h.intdigest() for h in self._hashers]


def pieces_checksums(pieces: Sequence[tuple[memoryview, int, range]], num_segments: int) -> list[int]:
    """xxh3_64 of each segment index over batch_pieces() (what BatchStream.checksums() gives for a batch)."""
    hashers = [xxhash.xxh3_64() for _ in range(num_segments)]
    for view, segment_index, _ in pieces:
        hashers[segment_index].update(view)
    return [h.intdigest() for h in hashers]


def batch_iov(pool: BlockPool, block_ids: Sequence[int]) -> np.ndarray:
    """[address, length] of the batch's bytes in this process's memory, in batch_pieces order (the pool's own
    segment_iov() where it has one and no staging rows; else from the pieces' views)."""
    if _agrees_with_segments(type(pool), "segment_iov") and not hasattr(pool, "row_of"):
        return coalesced(pool.segment_iov(block_ids))
    return coalesced(np.array([[np.frombuffer(view, dtype=np.uint8).ctypes.data, view.nbytes]
                               for view, _, _ in batch_pieces(pool, block_ids)], dtype=np.uint64).reshape(-1, 2))


def coalesced(pieces: np.ndarray) -> np.ndarray:
    """Adjacent pieces (one ends where the next starts: rows of consecutive blocks) joined: the kernel pins the
    pages of each piece on its own, so 6 KiB pieces cost it far more than the bytes do (measured: 2 GB/s)."""
    if len(pieces) < 2:
        return pieces
    starts_run = np.ones(len(pieces), dtype=bool)
    starts_run[1:] = pieces[1:, 0] != pieces[:-1, 0] + pieces[:-1, 1]
    first = np.flatnonzero(starts_run)
    return np.stack([pieces[first, 0], np.add.reduceat(pieces[:, 1], first)], axis=1)
