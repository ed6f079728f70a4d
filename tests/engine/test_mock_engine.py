"""The mock engine over the real transport: KV handover, leases, and every failed load ends in a recompute.

Two engines (a prefill one and a decode one) in one process, talking over real ZeroMQ sockets on loopback.
Faults come from the transport's own test hooks (pause, corrupt) and from real misuse (wrong token,
released transfer, other prompt, other layout).
"""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.base import EngineFull, KVLoadReport, TokenOutput
from pdserve.engine.mock import MockEngine, MockEngineConfig
from pdserve.engine.mock_model import predict
from pdserve.protocol import KVLayout, ModelCard, SamplingParams

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype="mock16", dtype_bytes=2, block_size=16)
CARD = ModelCard(name="m", tokenizer="byte", max_model_len=1024, kv_layout=LAYOUT)
PROMPT = tuple(range(1, 60))  # 4 blocks, the last one partial
SAMPLING = SamplingParams(max_tokens=12, temperature=0)


def make_engine(worker_id: str, card: ModelCard = CARD, num_kv_blocks: int = 64) -> MockEngine:
    return MockEngine(MockEngineConfig(
        worker_id=worker_id, card=card, num_kv_blocks=num_kv_blocks, ms_per_prompt_token=0, ms_per_decode_step=0,
        advertise_host="127.0.0.1", bind_host="127.0.0.1", kv_pull_timeout_s=1.0))


@pytest.fixture
async def engines():
    prefill, decode = make_engine("p"), make_engine("d")
    await prefill.start()
    await decode.start()
    loads: list[KVLoadReport] = []
    decode.loads = loads  # run_decode keeps the load reports of decode's streams here
    try:
        yield prefill, decode, loads
    finally:
        await prefill.stop()
        await decode.stop()


async def run_decode(decode: MockEngine, prompt, first_token_id, params) -> str:
    """The decoded text; the stream's load report, which comes before any token, goes to decode.loads."""
    text = []
    async for out in decode.generate("r1", prompt, SAMPLING, first_token_id, params):
        if isinstance(out, KVLoadReport):
            assert not text, "the load report comes before the tokens"
            decode.loads.append(out)
        else:
            assert isinstance(out, TokenOutput)
            text.append(out.text)
    return "".join(text)


async def test_kv_moves_and_decode_continues_from_the_first_token(engines):
    prefill, decode, loads = engines
    result = await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
    assert result.kv_transfer_params is not None and len(result.kv_transfer_params.block_ids) == 4
    assert prefill.stats()["num_held_blocks"] == 4
    rest = await run_decode(decode, PROMPT, result.first_token_id, result.kv_transfer_params)
    assert result.first_text + rest == predict(PROMPT, SAMPLING).text
    # two engines of one process: same host, so the bytes take the shm path
    assert loads == [KVLoadReport(4, 4 * LAYOUT.bytes_per_block, loads[0].transfer_ms, recomputed=False, transport="shm")]
    stats = decode.stats()
    assert stats["num_kv_blocks_received"] == 4 and stats["num_recomputes"] == 0
    assert stats["num_held_blocks"] == 0  # decode frees everything when the request ends
    assert await prefill.release_kv("r1") and prefill.stats()["num_held_blocks"] == 0
    assert prefill.stats()["num_kv_bytes_sent"] == 4 * LAYOUT.bytes_per_block


async def test_local_prefill_when_no_kv_is_offered(engines):
    _, decode, _ = engines
    text = await run_decode(decode, PROMPT, None, None)
    assert text == predict(PROMPT, SAMPLING).text
    assert decode.stats()["num_local_prefills"] == 1


@pytest.mark.parametrize("fault", ["wrong_token", "released", "paused", "corrupt", "other_prompt", "dead_endpoint"])
async def test_every_failed_load_recomputes_and_still_answers_right(engines, fault):
    prefill, decode, loads = engines
    prompt = PROMPT
    result = await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
    params = result.kv_transfer_params
    if fault == "wrong_token":
        params = params.model_copy(update={"token": "guess"})
    elif fault == "released":
        await prefill.release_kv("r1")
    elif fault == "paused":
        prefill._endpoint.pause_for_tests(3)
    elif fault == "corrupt":
        prefill._endpoint._corrupt_next_send_for_tests()
    elif fault == "other_prompt":  # transport fine, content wrong: the mock's own check refuses it
        prompt = tuple(range(2, 61))
    elif fault == "dead_endpoint":
        await prefill.stop()
    expected = predict(prompt, SAMPLING)
    start = asyncio.get_running_loop().time()
    text = await run_decode(decode, prompt, expected.token_ids[0], params)
    assert asyncio.get_running_loop().time() - start < 3  # kv_pull_timeout_s=1 bounds the paused case
    assert text == expected.text[1:]  # one character per token, no stop strings: the rest after token 0
    assert decode.stats()["num_recomputes"] == 1
    assert len(loads) == 1 and loads[0].recomputed and loads[0].error
    assert decode.stats()["num_held_blocks"] == 0


async def test_layout_mismatch_is_named_and_recomputed(engines):
    prefill, _, _ = engines
    other_card = CARD.model_copy(update={"kv_layout": LAYOUT.model_copy(update={"block_size": 32})})
    decode = make_engine("d2", other_card)
    await decode.start()
    reports: list[KVLoadReport] = []
    decode.loads = reports
    try:
        result = await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=10)
        text = await run_decode(decode, PROMPT, result.first_token_id, result.kv_transfer_params)
        assert result.first_text + text == predict(PROMPT, SAMPLING).text
        assert "same model, dtype and block size" in reports[0].error
    finally:
        await decode.stop()


async def test_lease_expiry_and_abort_free_the_blocks(engines):
    prefill, _, _ = engines
    await prefill.prefill("r1", PROMPT, SAMPLING, lease_s=0.2)
    assert prefill.stats()["num_held_blocks"] == 4
    await asyncio.sleep(0.4)
    assert prefill.stats()["num_held_blocks"] == 0
    await prefill.prefill("r2", PROMPT, SAMPLING, lease_s=10)
    await prefill.abort("r2")
    assert prefill.stats()["num_held_blocks"] == 0


async def test_single_token_requests_hold_nothing(engines):
    prefill, _, _ = engines
    result = await prefill.prefill("r1", PROMPT, SamplingParams(max_tokens=1), lease_s=10)
    assert result.finish_reason == "length" and result.kv_transfer_params is None
    assert prefill.stats()["num_held_blocks"] == 0


async def test_full_engine_refuses_instead_of_overcommitting():
    engine = make_engine("small", num_kv_blocks=5)
    await engine.start()
    try:
        await engine.prefill("r1", PROMPT, SAMPLING, lease_s=10)
        with pytest.raises(EngineFull):
            await engine.prefill("r2", PROMPT, SAMPLING, lease_s=10)
    finally:
        await engine.stop()
