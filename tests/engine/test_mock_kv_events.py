"""The mock engine's KV events and prefix cache: what it reports is exactly what it holds.

A recording sink counts the copies the engine reports (stored +1, removed -1 per block); after every step
the blocks with a copy must be exactly those whose KV the engine keeps: running or held requests' computed
full blocks and, with prefix caching, its cache.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from pdserve.engine.base import EngineFull, KVLoadReport, PrefillResult
from pdserve.engine.mock import MockEngine, MockEngineConfig
from pdserve.engine.mock_model import predict
from pdserve.kv.hashing import ROOT_HASH, block_hashes
from pdserve.protocol import KVLayout, ModelCard, SamplingParams

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="mock16", dtype_bytes=2, block_size=16)
CARD = ModelCard(name="m", tokenizer="byte", max_model_len=1024, kv_layout=LAYOUT)
SAMPLING = SamplingParams(max_tokens=6, temperature=0)
PROMPT = tuple(range(1, 70))  # 4 full blocks and a partial one
HASHES = block_hashes(PROMPT, 16)


class Sink:
    def __init__(self) -> None:
        self.copies: Counter[int] = Counter()
        self.log: list[tuple[str, tuple[int, ...], int | None]] = []

    def stored(self, block_hashes, parent_hash):
        self.log.append(("stored", tuple(block_hashes), parent_hash))
        self.copies.update(block_hashes)

    def removed(self, block_hashes):
        self.log.append(("removed", tuple(block_hashes), None))
        self.copies.subtract(block_hashes)
        assert min(self.copies.values(), default=0) >= 0, "removed a block that was never stored"

    def cleared(self):
        self.copies.clear()

    def held(self) -> set[int]:
        return {h for h, n in self.copies.items() if n > 0}


def make_engine(worker_id: str, *, prefix_caching: bool, num_kv_blocks: int = 64, ms_per_prompt_token: float = 0.0):
    return MockEngine(MockEngineConfig(
        worker_id=worker_id, card=CARD, num_kv_blocks=num_kv_blocks, ms_per_prompt_token=ms_per_prompt_token,
        ms_per_decode_step=0, advertise_host="127.0.0.1", bind_host="127.0.0.1", kv_pull_timeout_s=1.0,
        prefix_caching=prefix_caching), kv_events=Sink())


@pytest.fixture
async def pair(request):
    caching = getattr(request, "param", True)
    prefill, decode = make_engine("p", prefix_caching=caching), make_engine("d", prefix_caching=caching)
    await prefill.start()
    await decode.start()
    try:
        yield prefill, decode
    finally:
        await prefill.stop()
        await decode.stop()


async def decode_all(engine: MockEngine, request_id: str, prompt, result: PrefillResult | None) -> str:
    first = result.first_token_id if result else None
    params = result.kv_transfer_params if result else None
    outputs = engine.generate(request_id, prompt, SAMPLING, first, params)
    return "".join([out.text async for out in outputs if not isinstance(out, KVLoadReport)])


@pytest.mark.parametrize("pair", [False], indirect=True)
async def test_without_prefix_caching_blocks_are_reported_while_held_and_removed_when_freed(pair):
    prefill, decode = pair
    result = await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
    assert prefill.kv_events.log == [("stored", tuple(HASHES), ROOT_HASH)]  # full blocks only, after compute
    await decode_all(decode, "r1", PROMPT, result)
    assert decode.kv_events.held() == set()  # decode held them while it ran, freed them at the end
    assert [kind for kind, _, _ in decode.kv_events.log] == ["stored", "removed"]
    assert prefill.kv_events.held() == set(HASHES)
    await prefill.release_kv("r1")
    assert prefill.kv_events.held() == set() and prefill.stats()["num_held_blocks"] == 0


async def test_the_prefix_cache_keeps_served_prompts_and_a_repeat_computes_only_the_rest(pair):
    prefill, decode = pair
    first = await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
    text = await decode_all(decode, "r1", PROMPT, first)
    await prefill.release_kv("r1")
    assert first.first_text + text == predict(PROMPT, SAMPLING).text
    # Both keep the prompt's blocks after the request (and hold nothing: cached blocks are free to take).
    for engine in (prefill, decode):
        assert engine.kv_events.held() == set(HASHES)
        assert engine.stats()["num_held_blocks"] == 0 and engine.stats()["num_cached_blocks"] == 4
    longer = PROMPT + tuple(range(200, 240))
    again = await prefill.prefill("r2", longer, SAMPLING, lease_s=10)
    assert again.num_cached_tokens == 4 * 16
    assert prefill.kv_events.log[-1] == ("stored", tuple(block_hashes(longer, 16)[4:]), HASHES[3])
    assert prefill.stats()["num_cached_tokens"] == 64
    text = await decode_all(decode, "r2", longer, again)  # decode pulls into fresh blocks, then caches them
    assert again.first_text + text == predict(longer, SAMPLING).text
    await prefill.release_kv("r2")
    assert prefill.kv_events.held() == decode.kv_events.held() == set(block_hashes(longer, 16))


async def test_a_local_prefill_on_decode_uses_its_cache():
    engine = make_engine("d", prefix_caching=True, ms_per_prompt_token=2.0)
    await engine.start()
    try:
        expected = predict(PROMPT, SAMPLING).text
        assert await decode_all(engine, "r1", PROMPT, None) == expected
        start = asyncio.get_running_loop().time()
        assert await decode_all(engine, "r2", PROMPT, None) == expected
        assert asyncio.get_running_loop().time() - start < len(PROMPT) * 2.0 / 1000  # only the rest computed
        assert engine.stats()["num_cached_tokens"] == 64
    finally:
        await engine.stop()


async def test_a_full_cache_evicts_least_recent_tails_first_and_reports_them():
    engine = make_engine("p", prefix_caching=True, num_kv_blocks=8)
    await engine.start()
    try:
        prompts = [tuple(range(k * 100, k * 100 + 64)) for k in range(3)]  # 4 full blocks each
        for k, prompt in enumerate(prompts[:2]):
            await engine.prefill(f"r{k}", prompt, SAMPLING, lease_s=10)
            await engine.release_kv(f"r{k}")
        assert engine.kv_events.held() == set(block_hashes(prompts[0], 16) + block_hashes(prompts[1], 16))
        await engine.prefill("r2", prompts[2], SAMPLING, lease_s=10)  # needs 4: the oldest prompt goes, tail first
        evicted = [entry for entry in engine.kv_events.log if entry[0] == "removed"]
        assert evicted == [("removed", tuple(reversed(block_hashes(prompts[0], 16))), None)]
        assert engine.kv_events.held() == set(block_hashes(prompts[1], 16) + block_hashes(prompts[2], 16))
        with pytest.raises(EngineFull):  # 4 held + 4 cached blocks: a 5-block prompt can evict only 4
            await engine.prefill("r3", tuple(range(500, 580)), SAMPLING, lease_s=10)
        assert engine.kv_events.held() == set(block_hashes(prompts[1], 16) + block_hashes(prompts[2], 16))
    finally:
        await engine.stop()


async def test_a_prefill_aborted_before_its_compute_reports_nothing():
    engine = make_engine("p", prefix_caching=True, ms_per_prompt_token=50.0)
    await engine.start()
    try:
        task = asyncio.create_task(engine.prefill("r1", PROMPT, SAMPLING, lease_s=10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.kv_events.log == [] and engine.stats()["num_cached_blocks"] == 0
    finally:
        await engine.stop()


async def test_two_requests_with_one_prompt_hold_two_copies(pair):
    prefill, _ = pair
    await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
    await prefill.prefill("r2", PROMPT, SAMPLING, lease_s=10)  # r1 holds the cached blocks: computed again
    assert prefill.kv_events.copies[HASHES[0]] == 2
    await prefill.release_kv("r1")
    await prefill.release_kv("r2")  # the cache has these blocks already: r2's copies are freed
    assert all(prefill.kv_events.copies[h] == 1 for h in HASHES)


async def test_concurrent_requests_share_a_cached_prefix_and_it_is_not_evicted_while_in_use():
    engine = make_engine("p", prefix_caching=True, num_kv_blocks=12)
    await engine.start()
    try:
        await engine.prefill("r1", PROMPT, SAMPLING, lease_s=10)
        await engine.release_kv("r1")  # its 4 full blocks go to the cache
        a = await engine.prefill("r2", PROMPT, SAMPLING, lease_s=10)
        b = await engine.prefill("r3", PROMPT, SAMPLING, lease_s=10)
        assert a.num_cached_tokens == b.num_cached_tokens == 64  # both use the one cached copy
        assert all(engine.kv_events.copies[h] == 1 for h in HASHES)
        # 12 blocks: 4 shared cached + 1 partial each for r2 and r3 = 6 in use; a prompt of 7 blocks needs the
        # 6 free ones and one more, which only an eviction of the pinned prefix could give: refused.
        with pytest.raises(EngineFull):
            await engine.prefill("r4", tuple(range(500, 612)), SAMPLING, lease_s=10)
        assert engine.stats()["num_held_blocks"] == 6
        await engine.release_kv("r2")
        await engine.release_kv("r3")
        assert engine.stats()["num_held_blocks"] == 0 and engine.stats()["num_cached_blocks"] == 4
        assert engine.kv_events.held() == set(HASHES)
    finally:
        await engine.stop()
