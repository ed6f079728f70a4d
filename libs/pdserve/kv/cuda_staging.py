"""A BlockPool over CUDA KV tensors, through pinned host memory.

The transport reads and writes host memory (zmq frames), so GPU KV is staged: before a transfer is allowed,
its blocks are copied device -> pinned host (`stage_out`); a pull writes into pinned host slots
(`stage_in_begin`) and then they are copied host -> device (`stage_in_commit`); `unstage` gives the slots
back. Block ids stay vLLM's own: `segments(block_id)` returns the host slot that currently stages that
block, so neither the connector nor the transport knows staging exists. Slots are reference counted per
block (two transfers may share a prefix block).

Copies run on a side stream, one gather (index_select / index_copy_ on the device) and one cudaMemcpyAsync per
segment and run of consecutive host slots, then one synchronize. Slots are handed out lowest first, so a
transfer's blocks usually land in one run.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from pdserve.kv.pool import ArrayBlockPool

DEFAULT_MAX_STAGING_BYTES = 2 << 30


class StagingFull(RuntimeError):
    """More blocks to stage than the pinned staging buffer holds."""


class CudaStagingPool:
    def __init__(self, device_segments: Sequence[torch.Tensor], layout_tag: str = "", *,
                 max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES) -> None:
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

    @property
    def device_segments(self) -> list[torch.Tensor]:
        """The KV itself, [num_blocks, bytes per block] uint8 per segment array: what the cuda-ipc path copies
        device to device (host staging is for the tcp path only)."""
        return self._device

    # ---- BlockPool

    def segments(self, block_id: int) -> list[memoryview]:
        slot = self._slot.get(block_id)
        if slot is None:
            raise IndexError(f"block {block_id} is not staged in host memory; stage it before a transfer")
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

    # ---- staging

    def stage_out(self, block_ids: Sequence[int]) -> None:
        """Copy the blocks device -> pinned host, after all work queued so far on the current stream."""
        new = self._reserve(block_ids)
        if new:
            self._copy(new, to_host=True)

    def stage_in_begin(self, block_ids: Sequence[int]) -> None:
        self._reserve(block_ids)

    def stage_in_commit(self, block_ids: Sequence[int]) -> None:
        """Copy what a pull wrote into the host slots to the device blocks; returns once it is there."""
        self._copy(list(block_ids), to_host=False)

    def unstage(self, block_ids: Sequence[int]) -> None:
        with self._lock:
            for b in block_ids:
                refs = self._refs.get(b, 0) - 1
                if refs > 0:
                    self._refs[b] = refs
                elif refs == 0:
                    del self._refs[b]
                    self._free.append(self._slot.pop(b))

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

    def _copy(self, block_ids: list[int], *, to_host: bool) -> None:
        runs = self._slot_runs(block_ids)
        keep = []  # device temporaries must outlive the asynchronous copies that read or fill them
        with torch.cuda.device(self.device):
            stream = self._stream()
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for first_slot, ids in runs:
                    index = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
                    keep.append(index)
                    for dev, host in zip(self._device, self._host_tensors):
                        rows = host[first_slot:first_slot + len(ids)]
                        if to_host:
                            gathered = dev.index_select(0, index)
                            rows.copy_(gathered, non_blocking=True)
                        else:
                            gathered = rows.to(self.device, non_blocking=True)
                            dev.index_copy_(0, index, gathered)
                        keep.append(gathered)
            stream.synchronize()

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
