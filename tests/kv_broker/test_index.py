import random

from pdserve.kv.hashing import block_hashes
from services.kv_broker.index import BlockIndex


def test_block_hashes_are_chained_and_stable():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # only full blocks
    assert a == block_hashes(list(range(40)), 16)
    b = block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]


def test_lookup_counts_leading_blocks_per_worker():
    index = BlockIndex()
    hashes = block_hashes(list(range(64)), 16)
    index.store("w1", "m", hashes)
    index.store("w2", "m", hashes[:2])
    index.store("w3", "m", hashes[1:])  # no first block: no prefix match
    assert index.lookup("m", hashes) == {"w1": 4, "w2": 2}
    assert index.lookup("other-model", hashes) == {}


def test_refcounts_and_worker_drop():
    index = BlockIndex()
    hashes = block_hashes(list(range(32)), 16)
    index.store("w1", "m", hashes)
    index.store("w1", "m", hashes)
    index.remove("w1", "m", hashes)
    assert index.lookup("m", hashes) == {"w1": 2}
    index.drop_worker("w1")
    assert index.lookup("m", hashes) == {}


def test_random_events_match_a_brute_force_reference():
    rng = random.Random(7)
    index = BlockIndex()
    reference: dict[str, list[int]] = {}  # worker -> multiset of hashes as a list
    prompts = [block_hashes([rng.randrange(5) for _ in range(16 * 6)], 16) for _ in range(5)]
    for _ in range(500):
        worker = f"w{rng.randrange(4)}"
        prompt = rng.choice(prompts)[: rng.randrange(1, 7)]
        op = rng.random()
        if op < 0.5:
            index.store(worker, "m", prompt)
            reference.setdefault(worker, []).extend(prompt)
        elif op < 0.9:
            index.remove(worker, "m", prompt)
            held = reference.setdefault(worker, [])
            for h in prompt:
                if h in held:
                    held.remove(h)
        else:
            index.drop_worker(worker)
            reference.pop(worker, None)
        query = rng.choice(prompts)
        expected = {}
        for w, held in reference.items():
            n = 0
            while n < len(query) and query[n] in held:
                n += 1
            if n:
                expected[w] = n
        assert index.lookup("m", query) == expected
