"""A BlockPool over CUDA KV tensors, through pinned host memory, its copies overlapped with the transport.

The tcp path moves host memory (zmq frames), so GPU KV is staged. Block ids stay vLLM's own: `segments(block_id)`
returns the host slot that stages that block, so neither the connector nor the transport knows staging exists.
Slots are reference counted per block (two transfers may share a prefix block).

Pipelined, segment by segment (a transfer's bytes move segment-major: segment 0 of every block, then 1, ...):
  prefill  `stage_out` (at allow) only reserves slots and marks where the KV is complete on the device (an event
           on the current stream). When a pull over a host path starts, the endpoint calls `prepare_out`: one
           device -> host copy per segment is queued on a side stream, each followed by an event; before it
           reads segment k of a batch it calls `wait_out_segment`, so segment k goes on the wire while segment
           k+1 is still being copied. A transfer pulled over cuda-ipc is never copied to the host at all.
  decode   the client calls `commit_segment` as each segment of a batch has arrived in the host slots: its
           host -> device copy is queued at once, while the next segments arrive; `stage_in_commit` copies
           whatever was not committed that way and returns once everything is on the device. A batch whose
           checksum then fails makes the pull fail, and vLLM recomputes those blocks (their device copy is
           overwritten), as for any failed load.
Copies go in at most MAX_COPY_GROUPS groups of segments (of at least COPY_GROUP_NBYTES), each group one launch of cuda_ipc's copy kernel over a
table of (source, destination, length) chunks: the kernel reads and writes the pinned host slots directly (pinned
memory is mapped into the device's address space), so scattered vLLM blocks need no gather and no temporary.
One torch gather and copy per segment instead cost more host time than the copies took (measured on an H200
host, 64 MiB in 64 segments: 43 ms against 21 ms for the socket alone); they remain the fallback where the
kernel cannot run (no Triton, unaligned segments).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from pdserve.kv.errors import PathUnavailable
from pdserve.kv.pool import ArrayBlockPool

DEFAULT_MAX_STAGING_BYTES = 2 << 30
# Copies go in at most MAX_COPY_GROUPS groups per pull (or per batch, on the receiver) of at least
# COPY_GROUP_NBYTES: a group costs ~0.3-0.45 ms of host time on an H200 host (table, launch, event), its copy
# ~0.15 ms per 8 MiB at PCIe speed, and the socket ~2.5 ms per 8 MiB. Groups of 8 MiB (8 per 64 MiB) spent more
# host time than the overlap saved; four groups keep most of the overlap for a quarter of the launches.
COPY_GROUP_NBYTES = 8 << 20
MAX_COPY_GROUPS = 4


class StagingFull(RuntimeError):
    """More blocks to stage than the pinned staging buffer holds."""


@dataclass
class _OutCopy:
    """A staged-out block's way to the host: where its KV is complete on the device, and, once a pull queued its
    copy, one event per segment (shared by the blocks queued together)."""

    produced: torch.cuda.Event
    segment_done: list[torch.cuda.Event] | None = None


@dataclass
class _InCopy:
    num_arrived: int = 0  # segments in the host slot, in order
    segment_done: list[torch.cuda.Event] = field(default_factory=list)  # per committed segment, in order


class CudaStagingPool:
    def __init__(self, device_segments: Sequence[torch.Tensor], layout_tag: str = "", *,
                 max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES, copy_kernel: bool = True) -> None:
        if not device_segments:
            raise ValueError("CudaStagingPool needs at least one device tensor")
        self._device = [s.reshape(s.shape[0], -1).view(torch.uint8) for s in device_segments]
        device = {s.device for s in self._device}
        if len(device) != 1 or next(iter(device)).type != "cuda":
            raise ValueError(f"CudaStagingPool takes tensors of one CUDA device, got {sorted(map(str, device))}")
        self.device = device.pop()
        self.num_blocks: int = int(self._device[0].shape[0])
        self.segment_nbytes: tuple[int, ...] = tuple(int(s.shape[1]) for s in self._device)
        self.layout_tag: str = layout_tag
        block_nbytes = sum(self.segment_nbytes)
        self.num_slots = max(1, min(self.num_blocks, max_staging_bytes // block_nbytes))
        self._host_tensors = [torch.empty((self.num_slots, n), dtype=torch.uint8, pin_memory=True)
                              for n in self.segment_nbytes]
        self._host = ArrayBlockPool(self._host_tensors, layout_tag)
        self._lock = threading.Lock()
        self._slot: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._free = list(range(self.num_slots - 1, -1, -1))  # a stack: pops give the lowest slot first
        self._streams = threading.local()
        self._out: dict[int, _OutCopy] = {}  # staged-out blocks (stage_out .. unstage)
        self.num_bytes_to_host = 0  # copies queued, for tests and counters
        # why copies fall back to torch ops, once known
        self._kernel_unavailable: str | None = None if copy_kernel else "copy_kernel=False"
        self.num_bytes_to_device = 0
        self._in: dict[int, _InCopy] = {}  # staged-in blocks (stage_in_begin .. unstage)

    @property
    def device_segments(self) -> list[torch.Tensor]:
        """The KV itself, [num_blocks, bytes per block] uint8 per segment array: what the cuda-ipc path copies
        device to device (host staging is for the tcp path only)."""
        return self._device

    # ---- BlockPool

    def segments(self, block_id: int) -> list[memoryview]:
        """The block's host slot; a staged-out block's bytes are there (its copy is waited for) when this returns.
        The transport reads runs of slots through segment_span after wait_out_segment instead."""
        slot = self._slot.get(block_id)
        if slot is None:
            raise IndexError(f"block {block_id} is not staged in host memory; stage it before a transfer")
        if block_id in self._out:
            self.wait_out([block_id])
        return self._host.segments(slot)

    def row_of(self, block_id: int) -> int:
        """The staging slot of a staged block: a transfer's blocks take consecutive slots, so the transport
        moves each segment of a run of slots as one frame (segment_span) however scattered the block ids."""
        slot = self._slot.get(block_id)
        if slot is None:
            raise IndexError(f"block {block_id} is not staged in host memory; stage it before a transfer")
        return slot

    def segment_span(self, segment_index: int, first_slot: int, num_slots: int) -> memoryview:
        return self._host.segment_span(segment_index, first_slot, num_slots)

    # ---- whole-block copies to and from host memory (the vLLM host tier, kv.connector_host_tier)

    def read_blocks(self, block_ids: Sequence[int], out: np.ndarray, out_rows: Sequence[int]) -> None:
        """Copy each block into its row of out (uint8 [rows, block_nbytes], host memory; pinned copies faster), as
        ArrayBlockPool.read_blocks does; returns once the bytes are there. On the current stream, so after the
        work queued on it that produced the KV."""
        self._copy_whole_blocks(block_ids, out, out_rows, to_host=True)

    def write_blocks(self, block_ids: Sequence[int], data: np.ndarray, data_rows: Sequence[int]) -> None:
        """The inverse of read_blocks: rows of data into the blocks, queued on the current stream (before the work
        that reads them), the host rows read before it returns."""
        self._copy_whole_blocks(block_ids, data, data_rows, to_host=False)

    def _copy_whole_blocks(self, block_ids: Sequence[int], host_rows: np.ndarray, rows: Sequence[int], *,
                           to_host: bool) -> None:
        blocks = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        index = torch.as_tensor(list(rows), dtype=torch.long)
        host = torch.from_numpy(host_rows)
        offset = 0
        for seg in self._device:
            n = seg.shape[1]
            if to_host:
                host[index, offset:offset + n] = seg.index_select(0, blocks).cpu()
            else:
                seg.index_copy_(0, blocks, host[index, offset:offset + n].to(self.device))
            offset += n

    # ---- staging

    def stage_out(self, block_ids: Sequence[int]) -> None:
        """Reserve host slots for the blocks, whose KV is complete once the work queued so far on the current
        stream is: nothing is copied until a pull over a host path asks (prepare_out, wait_out_segment)."""
        new = self._reserve(block_ids)
        if new:
            produced = torch.cuda.Event()
            produced.record(torch.cuda.current_stream(self.device))
            with self._lock:
                for b in new:
                    self._out[b] = _OutCopy(produced)

    def wait_produced(self, block_ids: Sequence[int]) -> None:
        """Return once the staged-out blocks' KV is complete on the device: before another process reads it there
        (cuda-ipc, nixl), which no event of this process's streams orders."""
        with self._lock:
            produced = list({id(c.produced): c.produced for b in block_ids if (c := self._out.get(b)) is not None}.values())
        for event in produced:
            event.synchronize()

    def prepare_out(self, block_ids: Sequence[int]) -> None:
        """A pull over a host path starts: queue the device -> host copies of those blocks not queued yet, in
        groups of segments, an event after each group. Returns at once."""
        with self._lock:
            todo = [b for b in dict.fromkeys(block_ids) if b in self._out and self._out[b].segment_done is None]
            produced = list({id(self._out[b].produced): self._out[b].produced for b in todo}.values())
        if not todo:
            return
        events: list[torch.cuda.Event] = []
        for group in self._segment_groups(len(todo), range(len(self.segment_nbytes)),
                                          self._group_nbytes(len(todo))):
            event = self._queue_copies(todo, to_host=True, segments=group, wait_for=produced if not events else ())
            events += [event] * len(group)
        with self._lock:
            for b in todo:
                if b in self._out:
                    self._out[b].segment_done = events

    def wait_out_segment(self, block_ids: Sequence[int], segment_index: int) -> None:
        """Return once segment `segment_index` of the blocks is in their host slots."""
        with self._lock:
            unqueued = any((c := self._out.get(b)) is not None and c.segment_done is None for b in block_ids)
        if unqueued:  # a reader that did not call prepare_out first
            self.prepare_out(block_ids)
        for events in self._out_events(block_ids):
            events[segment_index].synchronize()

    def wait_out(self, block_ids: Sequence[int]) -> None:
        """Return once every segment of the blocks is in their host slots."""
        self.prepare_out(block_ids)
        for events in self._out_events(block_ids):
            events[-1].synchronize()  # one stream: the last segment's event follows every earlier copy

    def _out_events(self, block_ids: Sequence[int]) -> list[list[torch.cuda.Event]]:
        """The per-segment event lists of the blocks' queued copies to the host, each list once."""
        with self._lock:
            return list({id(c.segment_done): c.segment_done for b in block_ids
                         if (c := self._out.get(b)) is not None and c.segment_done is not None}.values())

    def stage_in_begin(self, block_ids: Sequence[int]) -> None:
        self._reserve(block_ids)
        with self._lock:
            for b in block_ids:
                self._in[b] = _InCopy()

    def commit_segment(self, block_ids: Sequence[int], segment_index: int) -> None:
        """Segment `segment_index` of the blocks has arrived in their host slots (segments arrive in order). Once
        the arrived, uncommitted segments make COMMIT_NBYTES, or the last segment is here, their host -> device
        copies are queued. Returns at once."""
        with self._lock:
            todo = [b for b in dict.fromkeys(block_ids)
                    if (c := self._in.get(b)) is not None and c.num_arrived == segment_index]
            for b in todo:
                self._in[b].num_arrived = segment_index + 1
            if not todo:
                return
            first = len(self._in[todo[0]].segment_done)
            if not all(len(self._in[b].segment_done) == first for b in todo):  # blocks shared with another pull
                return  # stage_in_commit copies what is left
        pending = range(first, segment_index + 1)
        nbytes = len(todo) * sum(self.segment_nbytes[k] for k in pending)
        if nbytes < self._group_nbytes(len(todo)) and segment_index + 1 < len(self.segment_nbytes):
            return
        event = self._queue_copies(todo, to_host=False, segments=pending)
        with self._lock:
            for b in todo:
                if b in self._in:
                    self._in[b].segment_done.extend([event] * len(pending))

    def stage_in_commit(self, block_ids: Sequence[int]) -> None:
        """Copy what a pull wrote into the host slots and was not committed segment by segment to the device
        blocks; returns once all of it is there."""
        with self._lock:
            partial = [b for b in dict.fromkeys(block_ids)
                       if len(self._in[b].segment_done if b in self._in else ()) < len(self.segment_nbytes)]
            waits = {id(e): e for b in block_ids if b in self._in for e in self._in[b].segment_done[-1:]}
        if partial:
            event = self._queue_copies(partial, to_host=False, segments=range(len(self.segment_nbytes)))
            waits[id(event)] = event
        for event in waits.values():
            event.synchronize()

    def unstage(self, block_ids: Sequence[int]) -> None:
        """Give the slots back, once no queued copy reads or writes them any more: a slot is reused at once, and
        a copy still queued for a failed pull must not land after vLLM recomputed the block."""
        with self._lock:
            last = [events[-1] for b in block_ids
                    if self._refs.get(b, 0) == 1 and (events := (
                        self._out[b].segment_done if b in self._out else self._in[b].segment_done if b in self._in
                        else None))]
        for event in {id(e): e for e in last}.values():
            event.synchronize()
        with self._lock:
            for b in block_ids:
                refs = self._refs.get(b, 0) - 1
                if refs > 0:
                    self._refs[b] = refs
                elif refs == 0:
                    del self._refs[b]
                    self._free.append(self._slot.pop(b))
                    self._out.pop(b, None)
                    self._in.pop(b, None)

    @property
    def num_staged_blocks(self) -> int:
        return len(self._slot)

    def _reserve(self, block_ids: Sequence[int]) -> list[int]:
        """Take a reference on each block's slot; returns the blocks that got a fresh slot."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise IndexError(f"block ids {bad[:8]} outside the pool of {self.num_blocks}")
        with self._lock:
            new = [b for b in dict.fromkeys(block_ids) if b not in self._slot]
            if len(new) > len(self._free):
                raise StagingFull(f"{len(new)} blocks to stage, {len(self._free)} of {self.num_slots} pinned staging "
                                  "slots free; raise max_staging_bytes or lower the lease")
            for b in new:
                self._slot[b] = self._free.pop()
            for b in block_ids:
                self._refs[b] = self._refs.get(b, 0) + 1
            return new

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(device=self.device)
        return stream

    def _group_nbytes(self, num_blocks: int) -> int:
        return max(COPY_GROUP_NBYTES, num_blocks * sum(self.segment_nbytes) // MAX_COPY_GROUPS)

    def _segment_groups(self, num_blocks: int, segments: range, group_nbytes: int) -> list[range]:
        """`segments` cut into consecutive groups of about group_nbytes for `num_blocks` blocks."""
        groups, first, nbytes = [], segments.start, 0
        for k in segments:
            nbytes += num_blocks * self.segment_nbytes[k]
            if nbytes >= group_nbytes:
                groups.append(range(first, k + 1))
                first, nbytes = k + 1, 0
        if first < segments.stop:
            groups.append(range(first, segments.stop))
        return groups

    def _queue_copies(self, block_ids: list[int], *, to_host: bool, segments: range,
                      wait_for: Sequence[torch.cuda.Event] = ()) -> torch.cuda.Event:
        """Queue the copies of the blocks' `segments` on this thread's side stream, one event after them;
        returns the event. Device temporaries (the table, or the fallback's gathers) are made on the side
        stream, so the caching allocator reuses their memory only for work queued after them there."""
        with self._lock:
            slots = [self._slot[b] for b in block_ids]
        with torch.cuda.device(self.device):
            stream = self._stream()
            if to_host:
                for event in wait_for:  # the KV is complete on the device
                    stream.wait_event(event)
            else:  # the device blocks are not in use by work queued before (vLLM allocated them for this load)
                stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                if not self._kernel_copies(block_ids, slots, to_host, segments):
                    self._torch_copies(block_ids, to_host, segments)
                event = torch.cuda.Event()
                event.record(stream)
        nbytes = len(block_ids) * sum(self.segment_nbytes[k] for k in segments)
        with self._lock:
            if to_host:
                self.num_bytes_to_host += nbytes
            else:
                self.num_bytes_to_device += nbytes
        return event

    def _kernel_copies(self, block_ids: list[int], slots: list[int], to_host: bool, segments: range) -> bool:
        """One launch of the copy kernel for every chunk of the segments, on the current stream; False where it
        cannot run (the caller copies with torch ops)."""
        if self._kernel_unavailable is not None:
            return False
        from pdserve.kv import cuda_ipc

        dev, host = [self._device[k] for k in segments], [self._host_tensors[k] for k in segments]
        dev_side = ([t.data_ptr() for t in dev], [t.stride(0) for t in dev], block_ids)
        host_side = ([t.data_ptr() for t in host], [t.stride(0) for t in host], slots)
        (sb, ss, src_rows), (db, ds, dst_rows) = (dev_side, host_side) if to_host else (host_side, dev_side)
        table = cuda_ipc.copy_table(sb, ss, db, ds, [t.shape[1] for t in dev], src_rows, dst_rows)
        if (table[:, :2] % 16).any() or (table[:, 2] % 8).any():
            self._kernel_unavailable = "segments not 16-byte aligned"
            return False
        try:
            on_device = torch.from_numpy(table).pin_memory().to(self.device, non_blocking=True)
            cuda_ipc.launch(on_device)
        except PathUnavailable as e:  # no Triton
            self._kernel_unavailable = str(e)
            return False
        return True

    def _torch_copies(self, block_ids: list[int], to_host: bool, segments: range) -> None:
        """The fallback: one gather (or slice) and one copy per segment and run of consecutive host slots."""
        for first_slot, ids in self._slot_runs(block_ids):
            if ids == list(range(ids[0], ids[0] + len(ids))):
                index: slice | torch.Tensor = slice(ids[0], ids[0] + len(ids))
            else:  # from pinned memory: from pageable memory the upload would wait for the stream's earlier copies
                index = torch.tensor(ids, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
            for k in segments:
                dev, rows = self._device[k], self._host_tensors[k][first_slot:first_slot + len(ids)]
                if isinstance(index, slice):
                    rows.copy_(dev[index], non_blocking=True) if to_host else dev[index].copy_(rows, non_blocking=True)
                elif to_host:
                    rows.copy_(dev.index_select(0, index), non_blocking=True)
                else:
                    dev.index_copy_(0, index, rows.to(self.device, non_blocking=True))

    def _slot_runs(self, block_ids: list[int]) -> list[tuple[int, list[int]]]:
        """The blocks grouped by runs of consecutive host slots: [(first slot, block ids in slot order)]."""
        with self._lock:
            by_slot = sorted((self._slot[b], b) for b in dict.fromkeys(block_ids))
        runs: list[tuple[int, list[int]]] = []
        for slot, b in by_slot:
            if runs and runs[-1][0] + len(runs[-1][1]) == slot:
                runs[-1][1].append(b)
            else:
                runs.append((slot, [b]))
        return runs
