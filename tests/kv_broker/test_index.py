from pdserve.kv.hashing import ROOT_HASH, block_hashes, chain_hashes
from services.kv_broker.index import BlockIndex


def test_block_hashes_are_chained_and_stable():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # only full blocks
    assert a == block_hashes(list(range(40)), 16)
    b = block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]


def test_a_chain_continued_from_its_parent_hashes_like_the_whole_prompt():
    tokens = list(range(100))
    whole = block_hashes(tokens, 16)
    assert chain_hashes(tokens[32:], 16, whole[1]) == whole[2:]
    assert chain_hashes(tokens, 16, ROOT_HASH) == whole


def test_lookup_counts_leading_blocks_per_worker():
    index = BlockIndex()
    hashes = block_hashes(list(range(64)), 16)
    index.store("w1", "m", hashes)
    index.store("w2", "m", hashes[:2])
    index.store("w3", "m", hashes[1:], parent_hash=hashes[0])  # no first block: no prefix match
    assert index.lookup("m", hashes) == {"w1": 4, "w2": 2}
    assert index.lookup("m", hashes[:1]) == {"w1": 1, "w2": 1}
    assert index.lookup("m", []) == {}
    assert index.lookup("other-model", hashes) == {}


def test_reports_are_idempotent_and_a_worker_drop_forgets_everything():
    index = BlockIndex()
    hashes = block_hashes(list(range(32)), 16)
    index.store("w1", "m", hashes)
    index.store("w1", "m", hashes)  # the same blocks again: still held once
    assert index.num_blocks("w1") == 2
    index.remove("w1", "m", hashes[1:])
    assert index.lookup("m", hashes) == {"w1": 1}
    index.remove("w1", "m", hashes[1:])  # not held any more: nothing changes
    index.remove("w9", "m", hashes)  # unknown worker: nothing changes
    assert index.lookup("m", hashes) == {"w1": 1}
    index.drop_worker("w1")
    assert index.lookup("m", hashes) == {} and index.view() == {}


def test_a_removed_middle_block_cuts_the_prefix_and_coming_back_restores_it():
    index = BlockIndex()
    hashes = block_hashes(list(range(16 * 6)), 16)
    index.store("w1", "m", hashes)
    index.remove("w1", "m", [hashes[2]])
    assert index.lookup("m", hashes) == {"w1": 2}
    index.store("w1", "m", [hashes[2]], parent_hash=hashes[1])
    assert index.lookup("m", hashes) == {"w1": 6}


def test_blocks_stored_before_their_parent_count_once_the_parent_arrives():
    index = BlockIndex()
    hashes = block_hashes(list(range(16 * 5)), 16)
    index.store("w1", "m", hashes[3:], parent_hash=hashes[2])
    index.store("w1", "m", hashes[1:2], parent_hash=hashes[0])
    assert index.lookup("m", hashes) == {}
    index.store("w1", "m", hashes[:1])
    assert index.lookup("m", hashes) == {"w1": 2}
    index.store("w1", "m", [hashes[2]], parent_hash=hashes[1])
    assert index.lookup("m", hashes) == {"w1": 5}


def test_models_are_separate_and_dropping_a_worker_covers_all_of_them():
    index = BlockIndex()
    hashes = block_hashes(list(range(32)), 16)
    index.store("w1", "a", hashes)
    index.store("w1", "b", hashes[:1])
    index.store("w2", "b", hashes)
    assert index.lookup("a", hashes) == {"w1": 2}
    assert index.lookup("b", hashes) == {"w1": 1, "w2": 2}
    index.drop_worker("w1")
    assert index.view() == {"b": {"w2": frozenset(hashes)}}


def test_workers_of_one_model_leave_one_after_the_other_after_their_blocks_went():
    """Found by the tracing e2e test: the last block's removal empties the model's tree, which is dropped;
    the workers that held blocks of it must still be able to leave."""
    from services.kv_broker.index import BlockIndex

    index = BlockIndex()
    for worker in ("w1", "w2"):
        index.store(worker, "m", [1, 2])
    for worker in ("w1", "w2"):
        index.remove(worker, "m", [1, 2])
    index.drop_worker("w1")
    index.drop_worker("w2")
    assert index.lookup("m", [1, 2]) == {} and index.workers() == []
