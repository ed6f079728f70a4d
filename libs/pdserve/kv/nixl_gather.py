"""nixl from GPU KV, serving side: a batch's scattered device pieces gathered into one registered device buffer, so
the puller READs one descriptor instead of one per piece.

Why: UCX moves each descriptor on its own (one cuda_ipc copy per piece on one host, one work request per piece over
RDMA). Measured on an H200, 64 MiB of paged KV as 2,048 pieces of 32 KiB: 1.80 GB/s READ piece by piece, against
638 GB/s for one 64 MiB descriptor; cuda_ipc's copy kernel gathers those pieces in ~0.05 ms.

A buffer belongs to the pull it was gathered for until that pull is neither being served nor waiting for its
"done" (the endpoint's book-keeping says which pulls are alive): however the pull ended, the buffer is then free
again. A READ a failed puller abandoned may still read a reused buffer; it lands in that puller's held landing
buffer and is never used. Where no buffer is free (or none can be allocated) the batch is described piece by piece.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

MAX_BUFFERS = 4  # of one batch's size each (64 MiB): the GPU memory the endpoint adds to the KV pool's, at start


class GatherBuffers:
    """MAX_BUFFERS registered device buffers of `nbytes` each on the KV's GPU, made by prepare() before the agent's
    metadata is taken: a registration made after it is not in the metadata pullers have, and their READs of it fail
    ("no specified or potential backend had the required registrations": seen on the H200 with buffers made on
    first need)."""

    def __init__(self, nixl, device, nbytes: int, alive: Callable[[object], bool]) -> None:
        self._nixl = nixl
        self._device = device
        self.nbytes = nbytes
        self._alive = alive  # whether a pull still uses what was gathered for it
        self._buffers: list[list] = []  # [tensor, registration, owner or None]

    def gather(self, owner, segments: Sequence, block_ids: Sequence[int]) -> int | None:
        """Copy the blocks' pieces, segment-major, into a free buffer now held by `owner`; its device address, or
        None where no buffer is free."""
        entry = self._free_buffer()
        if entry is None:
            return None
        buffer = entry[0]
        _gather(buffer, segments, block_ids)
        entry[2] = owner
        return buffer.data_ptr()

    def prepare(self) -> None:
        """Make and register the buffers (before the agent's metadata is taken); where that fails, batches go piece
        by piece."""
        import torch

        try:
            for _ in range(MAX_BUFFERS):
                buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self._device)
                registration = self._nixl.register_region(buffer.data_ptr(), self.nbytes, "VRAM",
                                                          self._device.index or 0)
                self._buffers.append([buffer, registration, None])
        except Exception as e:  # out of GPU memory, or NIXL refused
            logger.warning("kv nixl: %d of %d device buffers to gather GPU KV into (%s: %s); batches beyond them go "
                           "piece by piece", len(self._buffers), MAX_BUFFERS, type(e).__name__, e)

    def _free_buffer(self) -> list | None:
        for entry in self._buffers:
            if entry[2] is None or not self._alive(entry[2]):
                entry[2] = None
                return entry
        return None

    def close(self) -> None:
        """Before the agent closes: unregister (the buffers go with this object)."""
        for buffer, registration, _ in self._buffers:
            self._nixl.deregister_region(registration)
        self._buffers = []


def _gather(buffer, segments: Sequence, block_ids: Sequence[int]) -> None:
    """The blocks' rows of each segment array (uint8 [num_blocks, bytes]) into buffer, segment k of every block then
    k+1, with cuda_ipc's copy kernel (one launch), or one index_select per segment array where it cannot run."""
    import numpy as np
    import torch

    from pdserve.kv import cuda_ipc
    from pdserve.kv.errors import PathUnavailable

    sizes = [int(t.shape[1]) for t in segments]
    starts = np.cumsum([0] + [n * len(block_ids) for n in sizes[:-1]]).tolist()
    try:
        table = cuda_ipc.copy_table([t.data_ptr() for t in segments], [t.stride(0) for t in segments],
                                    [buffer.data_ptr() + s for s in starts], sizes, sizes, block_ids,
                                    range(len(block_ids)))
        cuda_ipc.copy(table, buffer.device)
    except PathUnavailable:
        index = torch.as_tensor(list(block_ids), device=buffer.device)
        for t, start, n in zip(segments, starts, sizes):
            torch.index_select(t, 0, index, out=buffer[start:start + n * len(block_ids)].view(len(block_ids), n))
        torch.cuda.current_stream(buffer.device).synchronize()
