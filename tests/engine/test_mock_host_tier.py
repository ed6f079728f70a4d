"""The mock engine's host-memory KV tier (kv/host_tier.py), with the worker's real event relay feeding a real broker
index: blocks evicted from a small engine cache are kept in host memory, stay in the index marked "host tier", are
copied back (not computed) when a prompt starts with them again, byte for byte (a decode engine pulls them over a
real socket and checks them), and are leased to a peer like cached blocks; the tier is bounded (least recently used
dropped, and forgotten by the index) and a restarted engine starts with it empty."""

from __future__ import annotations

import logging

import pytest

from pdserve.engine.base import KVLoadReport, prefix_lease_id
from pdserve.engine.mock import MockEngine, MockEngineConfig
from pdserve.kv.events import KVEventRelay
from pdserve.kv.host_tier import GIB
from tests.engine.test_mock_kv_events import CARD, LAYOUT, PROMPT, SAMPLING
from tests.engine.test_mock_prefix import full_block_hashes
from tests.kv.test_events import apply
from services.kv_broker.index import BlockIndex

LEASE_S = 5.0
OTHER = tuple(range(500, 500 + 8 * LAYOUT.block_size))  # 8 full blocks: evicts PROMPT's 4 from an 8-block cache


class Indexed:
    """An engine's events through a worker's relay into a broker's index, applied as they are queued."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.relay = KVEventRelay(worker_id, CARD.name, self._unused)
        self.index = BlockIndex()

    async def _unused(self, event) -> None:
        raise AssertionError("events are read from the queue")

    def sync(self) -> BlockIndex:
        while not self.relay._queue.empty():
            apply(self.index, [self.relay._queue.get_nowait()])
        return self.index


def make_engine(worker_id: str, *, num_host_blocks: int, num_kv_blocks: int = 8) -> tuple[MockEngine, Indexed]:
    indexed = Indexed(worker_id)
    engine = MockEngine(MockEngineConfig(
        worker_id=worker_id, card=CARD, num_kv_blocks=num_kv_blocks, ms_per_prompt_token=0.0, ms_per_decode_step=0,
        advertise_host="127.0.0.1", bind_host="127.0.0.1", kv_pull_timeout_s=1.0, prefix_caching=True,
        host_cache_gib=num_host_blocks * LAYOUT.bytes_per_block / GIB), kv_events=indexed.relay)
    return engine, indexed


@pytest.fixture
async def engines():
    started = []

    async def start(worker_id: str, **kwargs) -> tuple[MockEngine, Indexed]:
        engine, indexed = make_engine(worker_id, **kwargs)
        await engine.start()
        started.append(engine)
        return engine, indexed

    yield start
    for engine in started:
        await engine.stop()


async def run_and_release(engine: MockEngine, request_id: str, prompt):
    result = await engine.prefill(request_id, prompt, SAMPLING, LEASE_S)
    await engine.release_kv(request_id)
    return result


async def test_an_evicted_prefix_is_copied_back_from_host_memory_not_computed(engines):
    engine, indexed = await engines("p", num_host_blocks=16)
    decode, _ = await engines("d", num_host_blocks=0)
    hashes = full_block_hashes(PROMPT)
    cold = await run_and_release(engine, "r1", PROMPT)
    await run_and_release(engine, "r2", OTHER)  # the engine's 8 blocks: PROMPT's 4 cached ones evicted
    assert engine.stats()["num_host_tier_blocks"] == 4
    assert indexed.sync().lookup(CARD.name, hashes) == {"p": 4}  # still the worker's ...
    assert indexed.index.num_host_blocks({"p": 4}, hashes) == {"p": 4}  # ... in its host tier

    computed_before = engine.stats()["num_computed_prompt_tokens"]
    warm = await engine.prefill("r3", PROMPT, SAMPLING, LEASE_S)
    assert warm.first_token_id == cold.first_token_id
    assert warm.num_cached_tokens == 64  # 4 blocks of 16 copied back; the 5 tokens after them computed
    assert engine.stats()["num_prefix_host_loaded_tokens"] == 64
    assert engine.stats()["num_computed_prompt_tokens"] - computed_before == len(PROMPT) - 64
    assert indexed.sync().num_host_blocks({"p": 4}, hashes) == {}  # in the engine again

    # The copied-back KV is the prompt's, byte for byte: a decode engine pulls it and checks it.
    reports = [item async for item in decode.generate("r3", PROMPT, SAMPLING, warm.first_token_id,
                                                      warm.kv_transfer_params) if isinstance(item, KVLoadReport)]
    assert reports and not reports[0].recomputed and reports[0].num_blocks == 5
    await engine.release_kv("r3")
    assert engine.stats()["num_held_blocks"] == 0 and decode.stats()["num_held_blocks"] == 0


async def test_a_prefix_in_the_host_tier_is_leased_to_a_peer(engines):
    holder, _ = await engines("holder", num_host_blocks=16)
    loader, _ = await engines("loader", num_host_blocks=0, num_kv_blocks=64)
    cold = await run_and_release(holder, "r1", PROMPT)
    await run_and_release(holder, "r2", OTHER)
    lease = await holder.lease_prefix(prefix_lease_id("r3"), full_block_hashes(PROMPT), LEASE_S)
    assert lease is not None and len(lease.block_ids) == 4
    result = await loader.prefill("r3", PROMPT, SAMPLING, LEASE_S, prefix_kv=lease)
    assert result.first_token_id == cold.first_token_id and result.num_peer_loaded_tokens == 64
    assert await holder.release_kv(prefix_lease_id("r3"))
    assert holder.stats()["num_held_blocks"] == 0


async def test_the_tier_is_bounded_and_what_it_drops_leaves_the_index(engines):
    engine, indexed = await engines("p", num_host_blocks=3)
    hashes = full_block_hashes(PROMPT)
    await run_and_release(engine, "r1", PROMPT)
    await run_and_release(engine, "r2", OTHER)  # 4 evicted into 3 slots: the least recently used one dropped
    assert engine.stats()["num_host_tier_blocks"] == 3
    index = indexed.sync()
    held = index.held("p", CARD.name)
    assert sum(h in held for h in hashes) == 3 and index.host_only("p") <= set(hashes)
    assert len(index.host_only("p")) == 3


async def test_a_restarted_engine_starts_with_an_empty_tier_and_says_so(engines, caplog):
    engine, _ = await engines("p", num_host_blocks=16)
    await run_and_release(engine, "r1", PROMPT)
    await run_and_release(engine, "r2", OTHER)
    assert engine.stats()["num_host_tier_blocks"] == 4
    await engine.stop()
    with caplog.at_level(logging.INFO, logger="pdserve.engine.mock"):
        again, _ = await engines("p", num_host_blocks=16)
    assert again.stats()["num_host_tier_blocks"] == 0
    assert "host-memory KV tier of 16 blocks" in caplog.text and "empty at start" in caplog.text
    result = await again.prefill("r3", PROMPT, SAMPLING, LEASE_S)
    assert result.num_cached_tokens == 0


async def test_the_index_holds_exactly_what_the_engine_and_its_tier_hold_through_evictions_and_copies_back(engines):
    """Prompts taking turns through an 8-block cache and a 6-block tier: blocks are evicted, copied back, evicted
    again and dropped; after each request the index lists exactly the blocks in the cache or the tier, marked host
    tier where only the tier has them."""
    engine, indexed = await engines("p", num_host_blocks=10)
    third = tuple(range(900, 900 + 7 * LAYOUT.block_size + 5))
    # PROMPT is copied back (3rd) and evicted again while the tier still has it (4th); third pushes it out of the tier.
    for i, prompt in enumerate([PROMPT, OTHER, PROMPT, OTHER, third, PROMPT, third, OTHER, PROMPT, OTHER, third]):
        await run_and_release(engine, f"r{i}", prompt)
        index = indexed.sync()
        in_cache, in_tier = set(engine._cache), set(engine._host.keys())  # internals: the invariant's two sides
        assert index.held("p", CARD.name) == in_cache | in_tier, i
        assert index.host_only("p") == in_tier - in_cache, i
    assert engine.stats()["num_prefix_host_loaded_tokens"] > 0
