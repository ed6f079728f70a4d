"""A worker's host-memory KV tier: the blocks its engine evicts from its own cache, kept in a bounded pool of host
memory (--kv-host-cache-gib), least recently used dropped first, by chained block hash (kv.hashing).

The engine copies a block here as it evicts it and copies it back into a fresh engine block when a prompt (its
own, or a peer's lease) starts with it: a memory copy instead of a prefill. Blocks here stay in the KV broker's
index as the worker's, marked "host tier" (KVEvent.to_host). The pool lives in the process: a worker that restarts
starts with it empty.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

GIB = 1 << 30


class HostKVTier:
    def __init__(self, num_blocks: int, bytes_per_block: int):
        assert num_blocks > 0 and bytes_per_block > 0
        # np.empty maps pages lazily: an unused tier costs address space, not memory.
        self._data = np.empty((num_blocks, bytes_per_block), dtype=np.uint8)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recently used first
        self._free = list(range(num_blocks - 1, -1, -1))
        self.num_blocks_in = 0  # copies put here
        self.num_blocks_out = 0  # copies taken back

    @classmethod
    def sized(cls, gib: float, bytes_per_block: int) -> HostKVTier | None:
        """A tier of gib GiB (None for 0: no tier)."""
        num_blocks = int(gib * GIB) // bytes_per_block
        return cls(num_blocks, bytes_per_block) if num_blocks > 0 else None

    @property
    def capacity(self) -> int:
        return self._data.shape[0]

    @property
    def bytes_per_block(self) -> int:
        return self._data.shape[1]

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slot_of

    def put(self, block_hash: int, kv: np.ndarray) -> list[int]:
        """Keep a copy of the block (kv: its bytes) as the most recently used; returns the hashes dropped to make
        room (least recently used first). A block already here is only marked used."""
        slot = self._slot_of.get(block_hash)
        if slot is not None:
            self._slot_of.move_to_end(block_hash)
            return []
        dropped = []
        if not self._free:
            old, slot = self._slot_of.popitem(last=False)
            self._free.append(slot)
            dropped.append(old)
        slot = self._free.pop()
        self._data[slot] = kv
        self._slot_of[block_hash] = slot
        self.num_blocks_in += 1
        return dropped

    def leading(self, block_hashes: Sequence[int]) -> int:
        """How many of the leading block_hashes are here (up to the first that is not), marked used."""
        n = 0
        for h in block_hashes:
            if h not in self._slot_of:
                break
            self._slot_of.move_to_end(h)
            n += 1
        return n

    def copy_out(self, block_hash: int, out: np.ndarray) -> bool:
        """Copy the block into out (an engine block's bytes); False when it is not here (dropped meanwhile)."""
        slot = self._slot_of.get(block_hash)
        if slot is None:
            return False
        out[:] = self._data[slot]
        self.num_blocks_out += 1
        return True

    def clear(self) -> list[int]:
        """Drop every block; returns their hashes."""
        dropped = list(self._slot_of)
        self._slot_of.clear()
        self._free = list(range(self.capacity - 1, -1, -1))
        return dropped
