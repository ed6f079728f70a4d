"""The host-memory KV tier of pdserve's vLLM connector (kv.connector_host_tier), without starting a vLLM engine.

The connector's scheduler half (ConnectorScheduler, with host_cache_gib) is driven with real vLLM Requests (their
block hashes computed by vLLM's hasher) and a stand-in for vLLM's KVCacheBlocks (only get_block_ids is read); its
metadata goes to the worker half's HostTierStore over a CpuKVPool of two segment arrays, as vLLM's CPU KV tensors
would be. The tier's KV events go through pdserve's mapper into a real KVEventRelay. The whole path on a real
vLLM engine: the third test of tests/vllm/test_prefix_reuse.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from pdserve.kv.connector_host_tier import HostTierStore  # noqa: E402
from pdserve.kv.connector_scheduler import ConnectorScheduler  # noqa: E402
from pdserve.kv.events import KVEventRelay  # noqa: E402
from pdserve.kv.hashing import block_hashes  # noqa: E402
from pdserve.kv.host_tier import GIB  # noqa: E402
from pdserve.kv.vllm_events import VllmKVEventMapper  # noqa: E402
from pdserve.kv.vllm_pool import CpuKVPool  # noqa: E402
from pdserve.protocol import KVLayout, KVTransferParams  # noqa: E402

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32", dtype_bytes=4, block_size=BS)
NUM_SLOTS = 4
init_none_hash(sha256)


class Blocks:
    """vLLM's KVCacheBlocks as the connector reads it."""

    def __init__(self, block_ids: list[int]):
        self.block_ids = block_ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.block_ids,)


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=1), None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def finished(request: Request) -> Request:
    request.num_computed_tokens = request.num_tokens
    request.status = RequestStatus.FINISHED_STOPPED
    return request


def make_scheduler() -> ConnectorScheduler:
    gib = NUM_SLOTS * LAYOUT.bytes_per_block / GIB
    return ConnectorScheduler(LAYOUT, {"worker_id": "p", "host_cache_gib": gib}, "refcount")


def make_pool(num_blocks: int = 32) -> CpuKVPool:
    half = LAYOUT.bytes_per_block // 2  # two segments per block, as two layers' rows would be
    rng = np.random.default_rng(0)
    return CpuKVPool([rng.integers(0, 256, (num_blocks, half), dtype=np.uint8) for _ in range(2)])


def step(scheduler: ConnectorScheduler, store: HostTierStore, pool: CpuKVPool) -> None:
    """One engine step's metadata, applied by the worker half as it binds it."""
    meta = scheduler.build_connector_meta()
    store.copy(pool, meta.tier_saves, meta.tier_loads)


def load(scheduler: ConnectorScheduler, request: Request, block_ids: list[int], num_computed_tokens: int = 0) -> int:
    """What vLLM's scheduler does for a new request: ask, allocate, report the allocation; the tokens offered."""
    num_tokens, load_async = scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
    assert load_async is False  # a memory copy within the step, not a background load
    scheduler.update_state_after_alloc(request, Blocks(block_ids), num_tokens)
    return num_tokens


def test_a_finished_requests_blocks_are_copied_back_byte_for_byte_after_vllm_reused_them():
    scheduler, pool, store = make_scheduler(), make_pool(), HostTierStore(NUM_SLOTS, LAYOUT.bytes_per_block)
    tokens = list(range(100, 118))  # 4 full blocks and 2 tokens
    first = make_request("r1", tokens)
    assert load(scheduler, first, [10, 11, 12, 13, 14]) == 0  # an empty tier offers nothing
    before = [pool.block_bytes(b) for b in (10, 11, 12, 13)]
    scheduler.request_finished(finished(first), [10, 11, 12, 13, 14])
    step(scheduler, store, pool)
    for b in (10, 11, 12, 13):  # vLLM gives the freed blocks to other requests, which overwrite them
        for seg in pool.segments(b):
            seg[:] = b"\0" * len(seg)

    again = make_request("r2", tokens + [7])
    # Past vLLM's own hit of one block: the other three come from the tier (the prompt's last token is computed).
    assert load(scheduler, again, [20, 21, 22, 23, 24], num_computed_tokens=BS) == 3 * BS
    step(scheduler, store, pool)
    assert [pool.block_bytes(b) for b in (21, 22, 23)] == before[1:]
    assert scheduler.host_tier.stats() == {"num_host_tier_blocks": 4, "num_prefix_host_loaded_tokens": 3 * BS,
                                           "num_host_tier_saved_blocks": 4}


def test_a_prompt_of_whole_blocks_leaves_its_last_block_to_compute():
    scheduler, pool, store = make_scheduler(), make_pool(), HostTierStore(NUM_SLOTS, LAYOUT.bytes_per_block)
    tokens = list(range(16))
    scheduler.request_finished(finished(make_request("r1", tokens)), [1, 2, 3, 4])
    step(scheduler, store, pool)
    assert load(scheduler, make_request("r2", tokens), [5, 6, 7, 8]) == 3 * BS


def test_least_recently_used_copies_are_dropped_and_the_relay_is_told():
    scheduler = make_scheduler()
    relay = KVEventRelay("p", "m", publish=None)
    mapper = VllmKVEventMapper(relay, BS)
    old, new = list(range(16)), list(range(500, 512))
    for rid, tokens, block_ids in (("old", old, [1, 2, 3, 4]), ("new", new, [5, 6, 7])):
        request = finished(make_request(rid, tokens))
        # vLLM's block pool published the blocks as it cached them
        mapper.on_events([BlockStored(block_hashes=[maybe_convert_block_hash(h) for h in request.block_hashes],
                                      parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=None,
                                      medium="GPU", lora_name=None)])
        scheduler.request_finished(request, block_ids)
        mapper.on_events(scheduler.take_events())
    ours_old, ours_new = block_hashes(old, BS), block_hashes(new, BS)
    # 4 slots: the newer request's 3 blocks dropped the old one's 3 least recently used: its last three (a prompt's
    # blocks are saved last first, so that a prefix is dropped from its end).
    assert scheduler.host_tier.stats()["num_host_tier_blocks"] == NUM_SLOTS
    assert relay._blocks[ours_old[0]][2] == 1 and all(relay._blocks[h][2] == 0 for h in ours_old[1:])
    assert all(relay._blocks[h][2] == 1 for h in ours_new)
    # vLLM evicts the old blocks from its cache: the one the tier still has stays held, as host tier.
    mapper.on_events([BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in
                                                 make_request("x", old).block_hashes], medium="GPU")])
    assert set(relay.held()) == {ours_old[0], *ours_new}
    # The old prompt's first block is still there: it is offered, and nothing past it.
    assert load(scheduler, make_request("again", old + [1]), [9, 10, 11, 12, 13]) == BS


def test_a_request_larger_than_the_tier_keeps_its_first_blocks():
    scheduler, pool, store = make_scheduler(), make_pool(), HostTierStore(NUM_SLOTS, LAYOUT.bytes_per_block)
    tokens = list(range(24))  # 6 blocks, 4 slots
    request = finished(make_request("big", tokens))
    scheduler.request_finished(request, [1, 2, 3, 4, 5, 6])
    events = scheduler.take_events()
    (stored,) = events  # blocks stored and dropped within the request are neither stored nor removed
    assert isinstance(stored, BlockStored) and stored.medium == "CPU"
    assert sorted(stored.block_hashes) == sorted(maybe_convert_block_hash(h) for h in request.block_hashes[:4])
    meta = scheduler.build_connector_meta()
    assert sorted(b for b, _ in meta.tier_saves) == [1, 2, 3, 4]  # one save per slot: the last two were replaced
    assert len({s for _, s in meta.tier_saves}) == NUM_SLOTS
    store.copy(pool, meta.tier_saves, [])
    assert all(store.rows[slot].tobytes() == pool.block_bytes(b) for b, slot in meta.tier_saves)


def test_requests_with_kv_from_a_peer_take_no_tier_load():
    scheduler, pool, store = make_scheduler(), make_pool(), HostTierStore(NUM_SLOTS, LAYOUT.bytes_per_block)
    tokens = list(range(17))
    scheduler.request_finished(finished(make_request("r1", tokens)), [1, 2, 3, 4, 5])
    step(scheduler, store, pool)
    request = make_request("decode", tokens)
    request.kv_transfer_params = {"do_remote_prefill": True, "pdserve": {"bad": "params"}}
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # the peer's plan (here: refused) rules


def test_a_request_aborted_while_its_kv_is_pulled_saves_only_what_was_there_before():
    """vLLM counts a load's tokens as computed when it starts; blocks still waiting for the pull must not be saved
    under the prompt's hashes (a later prompt would get their garbage copied back)."""
    scheduler = make_scheduler()
    scheduler.address = "tcp://127.0.0.1:1"
    tokens = list(range(17))
    params = KVTransferParams(worker_id="p2", address="tcp://127.0.0.1:2", transfer_id="t", token="x",
                              block_ids=(1, 2, 3, 4, 5), num_tokens=17, kv_layout=LAYOUT, lease_expires_at=0.0)
    request = make_request("decode", tokens)
    request.kv_transfer_params = {"do_remote_prefill": True, "pdserve": params.model_dump(mode="json")}
    # vLLM's own cache had the first block; the rest but the last token is pulled in the background
    assert scheduler.get_num_new_matched_tokens(request, BS) == (len(tokens) - 1 - BS, True)
    scheduler.update_state_after_alloc(request, Blocks([10, 11, 12, 13, 14]), len(tokens) - 1 - BS)
    request.status = RequestStatus.FINISHED_ABORTED
    request.num_computed_tokens = len(tokens) - 1
    scheduler.request_finished(request, [10, 11, 12, 13, 14])
    meta = scheduler.build_connector_meta()
    assert meta.cancelled == ["decode"] and meta.tier_saves == [(10, meta.tier_saves[0][1])]


def test_a_connector_cache_reset_forgets_every_copy_and_tells_the_relay():
    """vLLM's reset_prefix_cache(reset_connector=True) (after a weight update, say) reaches the connector's
    reset_cache: copies made with the old weights are never loaded back, saves not made yet are dropped."""
    from pdserve.kv.vllm_connector import PdserveConnector

    connector = object.__new__(PdserveConnector)  # vLLM's scheduler-side connector around this scheduler half
    connector._scheduler = scheduler = make_scheduler()
    relay = KVEventRelay("p", "m", publish=None)
    mapper = VllmKVEventMapper(relay, BS)
    pool, store = make_pool(), HostTierStore(NUM_SLOTS, LAYOUT.bytes_per_block)
    tokens = list(range(9))
    first = finished(make_request("r1", tokens))
    vllm_hashes = [maybe_convert_block_hash(h) for h in first.block_hashes]
    mapper.on_events([BlockStored(block_hashes=vllm_hashes, parent_block_hash=None, token_ids=tokens[:8],
                                  block_size=BS, lora_id=None, medium="GPU", lora_name=None)])  # cached by vLLM
    scheduler.request_finished(first, [1, 2, 3])
    step(scheduler, store, pool)
    mapper.on_events(scheduler.take_events())
    mapper.on_events([BlockRemoved(block_hashes=vllm_hashes, medium="GPU")])  # then evicted from vLLM's cache
    assert set(relay.held()) == set(block_hashes(tokens, BS))  # held as host tier
    scheduler.request_finished(finished(make_request("r2", list(range(50, 59)))), [4, 5, 6])  # save not made yet

    assert connector.reset_cache() is True
    mapper.on_events(scheduler.take_events())
    assert relay.held() == {}
    assert scheduler.build_connector_meta().tier_saves == []
    assert load(scheduler, make_request("again", tokens + [1]), [7, 8, 9]) == 0
    assert scheduler.host_tier.stats()["num_host_tier_blocks"] == 0
    # The tier fills again after the reset.
    scheduler.request_finished(finished(make_request("r3", tokens)), [1, 2, 3])
    step(scheduler, store, pool)
    assert load(scheduler, make_request("again", tokens + [1]), [7, 8, 9]) == 2 * BS


def test_a_reset_of_vllms_own_cache_leaves_the_tiers_copies_in_the_index():
    """reset_prefix_cache() without reset_connector clears vLLM's cache only (AllBlocksCleared): the tier still
    loads its copies back, so the index keeps them, as host tier; the tier dropping them later removes them."""
    scheduler, relay = make_scheduler(), KVEventRelay("p", "m", publish=None)
    mapper = VllmKVEventMapper(relay, BS)
    in_tier, cache_only = list(range(8)), list(range(300, 308))
    for rid, tokens in (("in-tier", in_tier), ("cache-only", cache_only)):
        request = finished(make_request(rid, tokens))
        mapper.on_events([BlockStored(block_hashes=[maybe_convert_block_hash(h) for h in request.block_hashes],
                                      parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=None,
                                      medium="GPU", lora_name=None)])
    scheduler.request_finished(finished(make_request("in-tier", in_tier)), [1, 2])
    mapper.on_events(scheduler.take_events())

    mapper.on_events([AllBlocksCleared()])
    assert set(relay.held()) == set(block_hashes(in_tier, BS))
    assert all(relay._blocks[h][1:] == [0, 1] for h in block_hashes(in_tier, BS))  # host tier only
    assert load(scheduler, make_request("again", in_tier + [1]), [3, 4, 5]) == 2 * BS

    scheduler.reset_cache()
    mapper.on_events(scheduler.take_events())
    assert relay.held() == {}


def test_a_tier_copy_published_after_a_reset_of_vllms_cache_stays_in_the_index():
    """vLLM publishes a step's connector events after its block pool's: a request's blocks copied into the tier
    before a reset of vLLM's cache can come after the reset's AllBlocksCleared in one batch. They stay listed as host
    tier (the tier loads them back)."""
    scheduler, relay = make_scheduler(), KVEventRelay("p", "m", publish=None)
    mapper = VllmKVEventMapper(relay, BS)
    tokens = list(range(8))
    request = finished(make_request("r", tokens))
    cached = BlockStored(block_hashes=[maybe_convert_block_hash(h) for h in request.block_hashes],
                         parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=None, medium="GPU",
                         lora_name=None)
    mapper.on_events([cached])
    scheduler.request_finished(finished(make_request("r", tokens)), [1, 2])

    mapper.on_events([AllBlocksCleared(), *scheduler.take_events()])
    assert set(relay.held()) == set(block_hashes(tokens, BS))
    assert all(relay._blocks[h][1:] == [0, 1] for h in block_hashes(tokens, BS))  # host tier only
    assert load(scheduler, make_request("again", tokens + [1]), [3, 4, 5]) == 2 * BS
