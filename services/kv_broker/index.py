"""Which worker holds which KV blocks, by chained block hash (see pdserve.kv.hashing).

Workers report stored / removed blocks; a worker may hold the same block more than once (two requests
with one prompt), so each (worker, hash) is reference-counted. A lookup answers, per worker, how many
leading blocks of a prompt it holds: because hashes are chained, block k matching means blocks 0..k-1
are the same prefix.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence


class BlockIndex:
    def __init__(self) -> None:
        # model -> block hash -> worker_id -> refcount
        self._holders: dict[str, dict[int, Counter]] = defaultdict(dict)
        self._worker_models: dict[str, set[str]] = defaultdict(set)

    def store(self, worker_id: str, model: str, block_hashes: Sequence[int]) -> None:
        by_hash = self._holders[model]
        for h in block_hashes:
            by_hash.setdefault(h, Counter())[worker_id] += 1
        self._worker_models[worker_id].add(model)

    def remove(self, worker_id: str, model: str, block_hashes: Sequence[int]) -> None:
        by_hash = self._holders[model]
        for h in block_hashes:
            holders = by_hash.get(h)
            if holders is None or holders[worker_id] <= 0:
                continue
            holders[worker_id] -= 1
            if holders[worker_id] == 0:
                del holders[worker_id]
                if not holders:
                    del by_hash[h]

    def drop_worker(self, worker_id: str) -> None:
        for model in self._worker_models.pop(worker_id, ()):
            by_hash = self._holders[model]
            for h in [h for h, holders in by_hash.items() if worker_id in holders]:
                del by_hash[h][worker_id]
                if not by_hash[h]:
                    del by_hash[h]

    def lookup(self, model: str, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> number of leading blocks of block_hashes it holds (workers with 0 left out)."""
        by_hash = self._holders.get(model, {})
        matched: dict[str, int] = {}
        candidates: set[str] | None = None
        for k, h in enumerate(block_hashes):
            holders = set(by_hash.get(h, ()))
            candidates = holders if candidates is None else candidates & holders
            if not candidates:
                break
            for worker_id in candidates:
                matched[worker_id] = k + 1
        return matched

    def num_blocks(self, worker_id: str) -> int:
        return sum(holders[worker_id] for by_hash in self._holders.values() for holders in by_hash.values()
                   if worker_id in holders)
