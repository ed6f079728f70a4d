"""One model's prefix tree of KV blocks: which worker holds which blocks of which prompt prefix.

A node is a block, named by its chained hash (pdserve.kv.hashing). A chained hash names the block's whole
prefix, so nodes live in one hash table (any block found in O(1)) and each keeps its parent's hash: a
prompt's blocks are a path from the root (ROOT_HASH). Per node, two sets of workers as bit masks (bit i: the
worker in slot i; one Python int, whatever the number of workers):

- `mask`: the workers holding the block;
- `prefix`: the workers holding the block *and every block above it* up to the root.

A worker may hold a block without its parent (its engine evicted a block in the middle of a prefix, or
reported blocks whose parent was never reported): the block is in its `mask`, not in its `prefix`, and
joins `prefix` when the missing parent arrives. Lookups only read `prefix`: how many leading blocks of a
prompt worker w holds is the depth of the deepest block on the prompt's path whose `prefix` has w.
Along a path `prefix` only shrinks, so the answer for every worker follows from O(D log L) probes of the
path by bisection (L blocks in the prompt, D distinct answers; D <= number of workers + 1, and one when
every holder holds the same prefix), instead of a walk over all L blocks.

Keeping `prefix` right: each worker's held blocks are also grouped by parent (`_kids`), so a block that
becomes connected to the root connects its waiting held children, and a connected block removed in the
middle disconnects the held blocks below it, each visiting only that worker's own blocks.

Costs, with L the blocks of an event: store O(L) (plus the blocks it connects), remove O(L) (plus the
blocks it disconnects), dropping a worker O(blocks it holds), lookup O(D log L) dict probes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from pdserve.kv.hashing import ROOT_HASH


class _Node:
    __slots__ = ("parent", "mask", "prefix")

    def __init__(self, parent: int):
        self.parent = parent
        self.mask = 0
        self.prefix = 0


class PrefixTree:
    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}
        # worker_id -> parent hash -> the worker's held blocks under it: one hash, or a set when several
        # (most blocks have one child: a set per block would cost ~200 bytes each)
        self._kids: dict[str, dict[int, int | set[int]]] = {}
        self._slot_of: dict[str, int] = {}
        self._worker_in: list[str | None] = []  # slot -> worker_id
        self._free_slots: list[int] = []

    # ------------------------------------------------------------------------------------ updates

    def store(self, worker_id: str, block_hashes: Sequence[int], parent_hash: int = ROOT_HASH) -> None:
        """worker_id holds the chain block_hashes: each block the parent of the next, parent_hash the
        first's. Storing a held block again changes nothing. A node keeps the parent it was created with
        (chained hashes never disagree; a sender that does is not believed)."""
        if not block_hashes:
            return
        bit = 1 << self._slot(worker_id)
        kids = self._kids[worker_id]
        nodes = self._nodes
        parent = parent_hash
        for h in block_hashes:
            node = nodes.get(h)
            if node is None:
                node = nodes[h] = _Node(parent)
            elif node.mask & bit:
                parent = h
                continue
            node.mask |= bit
            up = node.parent
            _add_kid(kids, up, h)
            if up == ROOT_HASH or ((above := nodes.get(up)) is not None and above.prefix & bit):
                if h in kids:  # held blocks below it were waiting for it
                    self._set_prefix(h, bit, kids, True)
                else:
                    node.prefix |= bit
            parent = h

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """worker_id no longer holds these blocks (blocks it does not hold are ignored)."""
        kids = self._kids.get(worker_id)
        if kids is None:
            return
        bit = 1 << self._slot_of[worker_id]
        nodes = self._nodes
        for h in block_hashes:
            node = nodes.get(h)
            if node is None or not node.mask & bit:
                continue
            if node.prefix & bit:
                self._set_prefix(h, bit, kids, False)
            _remove_kid(kids, node.parent, h)
            node.mask &= ~bit
            if not node.mask:
                del nodes[h]

    def drop_worker(self, worker_id: str) -> None:
        """Forget everything worker_id holds (it left, or is about to re-send a snapshot)."""
        kids = self._kids.pop(worker_id, None)
        if kids is None:
            return
        slot = self._slot_of.pop(worker_id)
        keep = ~(1 << slot)
        nodes = self._nodes
        for h in _all_kids(kids):
            node = nodes[h]
            node.mask &= keep
            node.prefix &= keep
            if not node.mask:
                del nodes[h]
        self._worker_in[slot] = None
        self._free_slots.append(slot)

    def _set_prefix(self, h: int, bit: int, kids: dict, connected: bool) -> None:
        """h and the worker's held blocks below it join (connected) or leave the worker's prefix."""
        nodes = self._nodes
        todo = [h]
        while todo:
            x = todo.pop()
            node = nodes[x]
            node.prefix = node.prefix | bit if connected else node.prefix & ~bit
            below = kids.get(x)
            if below is not None:
                if isinstance(below, int):
                    todo.append(below)
                else:
                    todo.extend(below)

    def _slot(self, worker_id: str) -> int:
        slot = self._slot_of.get(worker_id)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._worker_in[slot] = worker_id
            else:
                slot = len(self._worker_in)
                self._worker_in.append(worker_id)
            self._slot_of[worker_id] = slot
            self._kids[worker_id] = {}
        return slot

    # ------------------------------------------------------------------------------------- queries

    def lookup(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> how many leading blocks of the prompt it holds (workers with none left out).

        f(d) = the workers holding the prompt's first d blocks = `prefix` of block d-1, when that node
        exists and hangs under block d-2 (else nobody). f only shrinks as d grows, so bisect: an interval
        [lo, hi] with f(lo) == f(hi) is constant inside; otherwise split it. Workers in f(lo) - f(lo+1)
        matched lo blocks; those in f(L) matched all L.
        """
        num_blocks = len(block_hashes)
        if not num_blocks:
            return {}
        nodes = self._nodes

        def holders(d: int) -> int:
            node = nodes.get(block_hashes[d - 1])
            if node is None or node.parent != (block_hashes[d - 2] if d > 1 else ROOT_HASH):
                return 0
            return node.prefix

        first = holders(1)
        if not first:
            return {}
        last = holders(num_blocks) if num_blocks > 1 else first
        matched: dict[str, int] = {}
        todo = [(1, first, num_blocks, last)]
        while todo:
            lo, at_lo, hi, at_hi = todo.pop()
            if at_lo == at_hi:
                continue
            if hi - lo == 1:
                self._name(at_lo & ~at_hi, lo, matched)
                continue
            mid = (lo + hi) // 2
            at_mid = holders(mid)
            todo.append((lo, at_lo, mid, at_mid))
            todo.append((mid, at_mid, hi, at_hi))
        self._name(last, num_blocks, matched)
        return matched

    def _name(self, bits: int, num_blocks: int, matched: dict[str, int]) -> None:
        worker_in = self._worker_in
        while bits:
            low = bits & -bits
            matched[worker_in[low.bit_length() - 1]] = num_blocks  # type: ignore[index]
            bits ^= low

    def held(self, worker_id: str) -> frozenset[int]:
        """The blocks worker_id holds."""
        return frozenset(_all_kids(self._kids.get(worker_id, {})))

    def num_blocks(self, worker_id: str) -> int:
        return sum(1 for _ in _all_kids(self._kids.get(worker_id, {})))

    def workers(self) -> list[str]:
        """Workers holding at least one block."""
        return [w for w, kids in self._kids.items() if kids]

    def parent_of(self, h: int) -> int | None:
        node = self._nodes.get(h)
        return node.parent if node else None

    def __len__(self) -> int:
        """Blocks held by at least one worker."""
        return len(self._nodes)


def _add_kid(kids: dict[int, int | set[int]], parent: int, h: int) -> None:
    below = kids.get(parent)
    if below is None:
        kids[parent] = h
    elif isinstance(below, int):
        kids[parent] = {below, h}
    else:
        below.add(h)


def _remove_kid(kids: dict[int, int | set[int]], parent: int, h: int) -> None:
    below = kids[parent]
    if isinstance(below, int):
        del kids[parent]
    else:
        below.discard(h)
        if len(below) == 1:
            kids[parent] = below.pop()


def _all_kids(kids: dict[int, int | set[int]]) -> Iterable[int]:
    for below in kids.values():
        if isinstance(below, int):
            yield below
        else:
            yield from below
