"""The prefix tree against a brute-force reference, under random stored / removed / worker-gone events.

Prompts are drawn over a tiny alphabet with one token per block, so they share prefixes, branch, and repeat.
Events store any run of a prompt's blocks (from its first block or from the middle, whose parent the tree
may never have seen), store again what is held, remove any blocks (the middle of a prefix too) and drop
workers; up to 80 workers, more than one machine word of bits. After every event each prompt and each of
its prefixes is looked up and compared with the reference: per worker, the set of blocks it holds, and the
answer is how many leading blocks of the query are in that set.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.kv.hashing import ROOT_HASH, chain_hashes
from services.kv_broker.prefix_tree import PrefixTree

prompts_st = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1, max_size=4)


def op_st(num_prompts: int):
    # Mostly a few workers (so events meet on the same worker's blocks), sometimes any of 80 (more workers
    # than bits in a machine word).
    worker = st.one_of(st.integers(0, 2), st.integers(0, 79)).map(lambda i: f"w{i}")
    prompt = st.integers(0, num_prompts - 1)
    span = st.tuples(st.integers(0, 7), st.integers(1, 8))
    return st.one_of(
        st.tuples(st.just("store"), worker, prompt, span),
        st.tuples(st.just("remove"), worker, prompt, st.lists(st.integers(0, 7), max_size=4)),
        st.tuples(st.just("drop"), worker),
    )


@st.composite
def scenarios(draw):
    prompts = draw(prompts_st)
    ops = draw(st.lists(op_st(len(prompts)), min_size=1, max_size=80))
    return prompts, ops


def reference_lookup(held: dict[str, set[int]], query: list[int]) -> dict[str, int]:
    answer = {}
    for worker, blocks in held.items():
        n = 0
        while n < len(query) and query[n] in blocks:
            n += 1
        if n:
            answer[worker] = n
    return answer


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_lookups_match_a_brute_force_reference(scenario):
    prompts, ops = scenario
    chains = [chain_hashes(p, 1, ROOT_HASH) for p in prompts]
    tree = PrefixTree()
    held: dict[str, set[int]] = {}
    for op in ops:
        if op[0] == "store":
            _, worker, p, (start, length) = op
            chain = chains[p]
            start = min(start, len(chain) - 1)
            blocks = chain[start:start + length]
            tree.store(worker, blocks, chain[start - 1] if start else ROOT_HASH)
            held.setdefault(worker, set()).update(blocks)
        elif op[0] == "remove":
            _, worker, p, positions = op
            blocks = [chains[p][i] for i in positions if i < len(chains[p])]
            tree.remove(worker, blocks)
            held.get(worker, set()).difference_update(blocks)
        else:
            tree.drop_worker(op[1])
            held.pop(op[1], None)
        for chain in chains:
            for end in range(1, len(chain) + 1):
                assert tree.lookup(chain[:end]) == reference_lookup(held, chain[:end]), (op, end)
    for worker, blocks in held.items():
        assert tree.held(worker) == blocks
        assert tree.num_blocks(worker) == len(blocks)
    assert len(tree) == len(set().union(*held.values())) if held else len(tree) == 0
    for worker in list(held):
        tree.drop_worker(worker)
    assert len(tree) == 0 and tree.workers() == []


def test_many_workers_with_different_prefixes_of_one_long_prompt():
    chain = chain_hashes(list(range(1024)), 1, ROOT_HASH)
    tree = PrefixTree()
    held = {}
    for w in range(100):
        n = (w * 37) % 1024 + 1
        tree.store(f"w{w}", chain[:n])
        held[f"w{w}"] = set(chain[:n])
    tree.remove("w5", [chain[100]])
    held["w5"].discard(chain[100])
    tree.store("w6", chain[900:], chain[899])  # w6 holds 0..222 and 900..1023: a gap in the middle
    held["w6"].update(chain[900:])
    for end in (1, 2, 100, 101, 512, 1024):
        assert tree.lookup(chain[:end]) == reference_lookup(held, chain[:end])


def test_a_node_keeps_the_parent_it_was_created_with():
    chain = chain_hashes([1, 2, 3], 1, ROOT_HASH)
    tree = PrefixTree()
    tree.store("w1", chain)
    tree.store("w2", chain[1:2], parent_hash=12345)  # a sender that disagrees with the chain is not believed
    assert tree.parent_of(chain[1]) == chain[0]
    assert tree.lookup(chain) == {"w1": 3}
    tree.store("w2", chain[:1])
    assert tree.lookup(chain) == {"w1": 3, "w2": 2}
