"""The mock engine's hold on blocks that a failed pull may still write into (kv/read_fence.py): its KV pulls READ
straight into the request's blocks over nixl, and when one fails with READs still running (a frozen prefill
process), those blocks are set aside, neither recomputed into nor given to another request, until the fence says
the READs ended. The request recomputes its prompt in other blocks meanwhile, as vLLM's scheduler would do it in a
new request. A mixin of MockEngine: it works on that engine's free list and held requests.
"""

from __future__ import annotations

import logging

from pdserve.engine.base import EngineFull
from pdserve.kv.read_fence import ReadFence

log = logging.getLogger(__name__)


class FencedBlocks:
    def _set_aside(self, request_id: str, held, fence: ReadFence) -> None:
        """The request's blocks leave it for the set-aside list (it holds none afterwards)."""
        log.warning("request %s: %d KV blocks set aside until %d READs of the failed pull end (the prefill "
                    "process stopped answering)", request_id, len(held.block_ids), fence.num_in_flight)
        self._fenced.append((fence, held.block_ids))
        held.block_ids = []

    def _move_off_fenced(self, request_id: str, held, fence: ReadFence) -> None:
        """After a failed pull whose READs still run: the request gets fresh blocks to recompute into, and its own
        are set aside. EngineFull when there are not enough free ones."""
        num_blocks = len(held.block_ids)
        self._reclaim_fenced()
        if num_blocks > len(self._free) + self._num_evictable():
            raise EngineFull(f"request {request_id}: its {num_blocks} KV blocks may still be written by a frozen "
                             f"prefill's READs and no {num_blocks} others are free to recompute in")
        fresh = self._take_free(num_blocks)
        self._set_aside(request_id, held, fence)
        held.block_ids = fresh

    def _reclaim_fenced(self) -> None:
        """Blocks whose READs have all ended are free again."""
        still = []
        for fence, block_ids in self._fenced:
            if fence.ended():
                self._free.extend(block_ids)
                log.info("%d KV blocks set aside after a failed pull are free again (its READs ended)",
                         len(block_ids))
            else:
                still.append((fence, block_ids))
        self._fenced = still

    @property
    def num_fenced_blocks(self) -> int:
        return sum(len(block_ids) for _, block_ids in self._fenced)
