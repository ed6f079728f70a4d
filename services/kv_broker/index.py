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
        if tree is not None:
            tree.remove(worker_id, block_hashes)

    def drop_worker(self, worker_id: str) -> None:
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
