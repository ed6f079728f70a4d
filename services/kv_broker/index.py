"""Which worker holds which KV blocks: one prefix tree (prefix_tree.py) per model.

Workers report blocks by chained block hash (pdserve.kv.hashing); a lookup answers, per worker, how many
leading blocks of a prompt it holds. Reports are idempotent: a worker counts its engine's copies of a block
itself and reports a block once while it holds any (pdserve.kv.events), so a repeated store or a remove of
an unheld block changes nothing here.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from pdserve.kv.hashing import ROOT_HASH
from services.kv_broker.prefix_tree import PrefixTree


class BlockIndex:
    def __init__(self) -> None:
        self._trees: dict[str, PrefixTree] = {}
        self._models_of: dict[str, set[str]] = {}  # worker_id -> models it reported blocks of
        self._host_only: dict[str, set[int]] = {}  # worker_id -> held blocks only its host-memory tier holds

    def store(self, worker_id: str, model: str, block_hashes: Sequence[int], parent_hash: int = ROOT_HASH) -> None:
        """worker_id holds the chain block_hashes (each the parent of the next; parent_hash the first's)."""
        if not block_hashes:
            return
        tree = self._trees.get(model)
        if tree is None:
            tree = self._trees[model] = PrefixTree()
        tree.store(worker_id, block_hashes, parent_hash)
        self._models_of.setdefault(worker_id, set()).add(model)

    def remove(self, worker_id: str, model: str, block_hashes: Iterable[int]) -> None:
        tree = self._trees.get(model)
        host_only = self._host_only.get(worker_id)
        if host_only:
            block_hashes = list(block_hashes)
            host_only.difference_update(block_hashes)
        if tree is not None:
            tree.remove(worker_id, block_hashes)

    def set_tier(self, worker_id: str, to_host: Iterable[int] = (), to_device: Iterable[int] = ()) -> None:
        """Which held blocks of worker_id only its host-memory tier holds (to_host) or its engine again (to_device)."""
        host_only = self._host_only.setdefault(worker_id, set())
        host_only.update(to_host)
        host_only.difference_update(to_device)

    def host_only(self, worker_id: str) -> frozenset[int]:
        """The held blocks of worker_id that only its host-memory tier holds."""
        return frozenset(self._host_only.get(worker_id, ()))

    def drop_worker(self, worker_id: str) -> None:
        self._host_only.pop(worker_id, None)
        for model in self._models_of.pop(worker_id, ()):
            tree = self._trees.get(model)
            if tree is None:  # emptied (and removed) when another worker of the model left
                continue
            tree.drop_worker(worker_id)
            if not len(tree):
                del self._trees[model]

    def lookup(self, model: str, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> number of leading blocks of block_hashes it holds (workers with 0 left out)."""
        tree = self._trees.get(model)
        return tree.lookup(block_hashes) if tree is not None else {}

    def num_host_blocks(self, matched: dict[str, int], block_hashes: Sequence[int]) -> dict[str, int]:
        """Of each worker's matched leading blocks, how many only its host tier holds (0s left out)."""
        counts = {}
        for worker_id, n in matched.items():
            host_only = self._host_only.get(worker_id)
            if host_only and (k := sum(1 for h in block_hashes[:n] if h in host_only)):
                counts[worker_id] = k
        return counts

    def workers(self) -> list[str]:
        """Workers with blocks in the index."""
        return list(self._models_of)

    def num_blocks(self, worker_id: str) -> int:
        return sum(self._trees[m].num_blocks(worker_id) for m in self._models_of.get(worker_id, ()) if m in self._trees)

    def held(self, worker_id: str, model: str) -> frozenset[int]:
        tree = self._trees.get(model)
        return tree.held(worker_id) if tree is not None else frozenset()

    def view(self) -> dict[str, dict[str, frozenset[int]]]:
        """model -> worker_id -> blocks held: the whole index, for comparisons (tests, resync checks)."""
        return {model: {w: tree.held(w) for w in tree.workers()} for model, tree in self._trees.items()
                if tree.workers()}
