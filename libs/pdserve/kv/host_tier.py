"""A worker's host-memory KV tier: the blocks its engine evicts from its own cache, kept in a bounded pool of host
memory (--kv-host-cache-gib), least recently used dropped first.

The engine copies a block here and copies it back into a fresh engine block when a prompt (its own, or a peer's
lease) starts with it: a memory copy instead of a prefill. Blocks here stay in the KV broker's index as the worker's,
marked "host tier" (KVEvent.to_host). The pool lives in the process: a worker that restarts starts with it empty.

TierSlots is the index (block key -> slot, LRU); HostKVTier adds the bytes, for an engine whose index and KV live in
one process (the mock, keyed by pdserve's chained block hashes). vLLM's connector keeps the index in its scheduler
half and the bytes in its worker half (kv.connector_host_tier).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

import numpy as np

GIB = 1 << 30


def num_tier_blocks(gib: float, bytes_per_block: int) -> int:
    """How many blocks of bytes_per_block a tier of gib GiB holds."""
    return int(gib * GIB) // bytes_per_block if bytes_per_block > 0 else 0


class TierSlots:
    """Which block is in which of num_slots slots, least recently used first."""

    def __init__(self, num_slots: int):
        assert num_slots > 0
        self.capacity = num_slots
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def slot(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def keys(self) -> list[Hashable]:
        """The keys here, least recently used first."""
        return list(self._slot_of)

    def put(self, key: Hashable) -> tuple[int, list[Hashable], bool]:
        """(the key's slot, the keys dropped to make room, whether the key is new here). A key already here is only
        marked used; a new one takes a free slot, or the least recently used one's."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            return slot, [], False
        dropped = []
        if not self._free:
            old, old_slot = self._slot_of.popitem(last=False)
            self._free.append(old_slot)
            dropped.append(old)
        slot = self._free.pop()
        self._slot_of[key] = slot
        return slot, dropped, True

    def leading(self, keys: Iterable[Hashable]) -> int:
        """How many of the leading keys are here (up to the first that is not), marked used, the first most recently:
        a prefix is dropped from its end, never from its start."""
        found = []
        for key in keys:
            if key not in self._slot_of:
                break
            found.append(key)
        for key in reversed(found):
            self._slot_of.move_to_end(key)
        return len(found)

    def clear(self) -> list[Hashable]:
        """Drop every key; returns them."""
        dropped = list(self._slot_of)
        self._slot_of.clear()
        self._free = list(range(self.capacity - 1, -1, -1))
        return dropped


class HostKVTier:
    """TierSlots with the blocks' bytes, keyed by pdserve's block hashes."""

    def __init__(self, num_blocks: int, bytes_per_block: int):
        assert num_blocks > 0 and bytes_per_block > 0
        # np.empty maps pages lazily: an unused tier costs address space, not memory.
        self._data = np.empty((num_blocks, bytes_per_block), dtype=np.uint8)
        self._slots = TierSlots(num_blocks)
        self.num_blocks_in = 0  # copies put here
        self.num_blocks_out = 0  # copies taken back

    @classmethod
    def sized(cls, gib: float, bytes_per_block: int) -> HostKVTier | None:
        """A tier of gib GiB (None for 0: no tier)."""
        num_blocks = num_tier_blocks(gib, bytes_per_block)
        return cls(num_blocks, bytes_per_block) if num_blocks > 0 else None

    @property
    def capacity(self) -> int:
        return self._slots.capacity

    @property
    def bytes_per_block(self) -> int:
        return self._data.shape[1]

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def keys(self) -> list[int]:
        return self._slots.keys()

    def put(self, block_hash: int, kv: np.ndarray) -> list[int]:
        """Keep a copy of the block (kv: its bytes) as the most recently used; returns the hashes dropped to make
        room (least recently used first). A block already here is only marked used."""
        slot, dropped, new = self._slots.put(block_hash)
        if new:
            self._data[slot] = kv
            self.num_blocks_in += 1
        return dropped

    def leading(self, block_hashes: Iterable[int]) -> int:
        """How many of the leading block_hashes are here (up to the first that is not), marked used."""
        return self._slots.leading(block_hashes)

    def copy_out(self, block_hash: int, out: np.ndarray) -> bool:
        """Copy the block into out (an engine block's bytes); False when it is not here (dropped meanwhile)."""
        slot = self._slots.slot(block_hash)
        if slot is None:
            return False
        out[:] = self._data[slot]
        self.num_blocks_out += 1
        return True

    def clear(self) -> list[int]:
        """Drop every block; returns their hashes."""
        return self._slots.clear()
