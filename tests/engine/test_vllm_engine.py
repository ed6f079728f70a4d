"""The vLLM engine refuses what vLLM's KV cache cannot take now (EngineFull), without a running vLLM.

The engine is built as the factory builds it (constructing one starts nothing) and given the stats a running
engine reads: the connector's worker-side counters and the block pool's free count that the scheduler side
publishes (connector_stats.pool_stats_path). No vLLM runs, so a request the check lets through would fail on
the missing AsyncLLM: the tests call the check itself for those. Also without vLLM: how a pulled decode's
stream merges vLLM's outputs with the connector's load report (vllm_io.with_report).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

import orjson
import pytest

from pdserve.engine.base import EngineFull, KVLoadReport, TokenOutput
from pdserve.engine.vllm_engine import VllmEngine, VllmEngineConfig
from pdserve.engine.vllm_io import with_report as _with_report
from pdserve.kv.connector_stats import pool_stats_path
from pdserve.protocol import KVLayout, KVTransferParams, ModelCard, SamplingParams

BLOCK_SIZE = 32
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", dtype_bytes=4, block_size=BLOCK_SIZE)
CARD = ModelCard(name="m", tokenizer="unused", max_model_len=1024, kv_layout=LAYOUT)
SAMPLING = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture
def engine():
    engine = VllmEngine(VllmEngineConfig(
        worker_id=f"test-{uuid.uuid4().hex[:8]}", model_path=Path("unused"), card=CARD, advertise_host="127.0.0.1",
        bind_host="127.0.0.1", kv_lease_s=30.0, kv_pull_timeout_s=1.0))
    yield engine
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pool_stats_path(engine._stats_path))


def publish_pool(engine: VllmEngine, num_free_blocks: int) -> None:
    """What the connector's scheduler side writes for the worker (PoolUsagePublisher)."""
    with open(pool_stats_path(engine._stats_path), "wb") as f:
        f.write(orjson.dumps({"num_free_blocks": num_free_blocks, "kv_usage": 0.9, "published_at": 0}))


def transfer_params() -> KVTransferParams:
    return KVTransferParams(worker_id="p1", address="tcp://127.0.0.1:1", transfer_id="t", token="s",
                            block_ids=(1, 2, 3), num_tokens=90, kv_layout=LAYOUT, lease_expires_at=0.0)


async def test_prefill_and_decode_are_refused_when_the_pool_has_fewer_free_blocks_than_the_prompt_needs(engine):
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 0})
    publish_pool(engine, 2)
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 0})  # as _refresh_forever does every 0.5 s
    assert engine.stats()["num_free_blocks"] == 2
    prompt = tuple(range(90))  # 3 blocks of 32
    with pytest.raises(EngineFull, match="3 KV blocks needed, 2 free"):
        await engine.prefill("r1", prompt, SAMPLING, lease_s=30)
    with pytest.raises(EngineFull):  # a pulled decode: prompt + first token, the same 3 blocks
        async for _ in engine.generate("r2", prompt, SAMPLING, 7, transfer_params()):
            pass
    with pytest.raises(EngineFull):  # a local prefill
        async for _ in engine.generate("r3", prompt, SAMPLING, None, None):
            pass
    assert engine.stats()["num_running"] == 0  # refused before anything started
    engine._check_room("r4", 64)  # 2 blocks fit


async def test_the_check_follows_the_published_pool_as_it_changes(engine):
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 0})
    publish_pool(engine, 0)
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 0})
    with pytest.raises(EngineFull):
        engine._check_room("r1", 1)
    publish_pool(engine, 50)  # requests ended, or their blocks became evictable prefix cache
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 0})
    engine._check_room("r1", 50 * BLOCK_SIZE)
    with pytest.raises(EngineFull):
        engine._check_room("r1", 50 * BLOCK_SIZE + 1)


def test_until_the_pool_is_published_held_blocks_count_and_before_any_stats_nothing_is_refused(engine):
    engine._check_room("r1", 10_000)  # no stats read yet: the engine does not know, it does not refuse
    engine._set_stats({"num_total_blocks": 10, "num_held_blocks": 8})
    engine._check_room("r1", 2 * BLOCK_SIZE)
    with pytest.raises(EngineFull):
        engine._check_room("r1", 2 * BLOCK_SIZE + 1)


async def test_a_resume_with_nothing_left_to_generate_needs_no_room(engine):
    engine._set_stats({"num_total_blocks": 100, "num_held_blocks": 100})
    outputs = [out async for out in engine.generate("r1", (1, 2, 3), SamplingParams(max_tokens=2), None, None,
                                                    resume_token_ids=(4, 5))]
    assert outputs == [TokenOutput((), "", "length")] and not any(isinstance(o, KVLoadReport) for o in outputs)


# The stream of a pulled decode: vLLM's outputs with the connector's load report put in as soon as it comes.

async def fake_outputs(times_s: list[float], log: list[str]):
    """vLLM's generate, as far as _with_report sees it: outputs after the given delays."""
    try:
        for i, delay in enumerate(times_s):
            await asyncio.sleep(delay)
            yield f"out{i}"
    except BaseException as e:
        log.append(type(e).__name__)  # how it was stopped (vLLM's generate aborts the request on either)
        raise


def report_after(delay_s: float | None) -> asyncio.Task:
    """The report task; delay None: the connector's report never came (the task's result is None)."""
    async def wait() -> KVLoadReport | None:
        await asyncio.sleep(delay_s or 0)
        return None if delay_s is None else KVLoadReport(3, 300, 1.0, recomputed=False, transport="tcp")
    return asyncio.create_task(wait())


async def collect(stream) -> list:
    return [item if isinstance(item, str) else "report" async for item in stream]


async def test_the_report_goes_out_the_moment_it_comes_before_the_first_output():
    items = await collect(_with_report(fake_outputs([0.05, 0.0], []), report_after(0.0)))
    assert items == ["report", "out0", "out1"]


async def test_a_report_later_than_an_output_does_not_hold_the_outputs_back():
    loop = asyncio.get_running_loop()
    stream = _with_report(fake_outputs([0.0, 0.1, 0.0], []), report_after(0.05))
    seen = [(await anext(stream), loop.time())]
    seen.append((await anext(stream), loop.time()))
    assert seen[0][0] == "out0" and isinstance(seen[1][0], KVLoadReport)
    assert seen[1][1] - seen[0][1] < 0.09  # the report, as soon as it came: not after out1
    assert await collect(stream) == ["out1", "out2"]


async def test_a_lost_report_is_not_an_item_and_outputs_that_end_first_do_not_wait_for_it():
    assert await collect(_with_report(fake_outputs([0.0, 0.0], []), report_after(None))) == ["out0", "out1"]
    slow = report_after(5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await collect(_with_report(fake_outputs([0.0], []), slow)) == ["out0"]
    assert loop.time() - start < 1 and not slow.done()  # left to its task (it ends the "kv pull" span)
    slow.cancel()


async def test_closing_the_stream_while_it_waits_stops_vllms_generate():
    log: list[str] = []
    report = report_after(5.0)
    stream = _with_report(fake_outputs([5.0], log), report)
    waiter = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    waiter.cancel()  # the decode task was cancelled while waiting for the first output or the report
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await stream.aclose()
    assert log == ["CancelledError"]
    report.cancel()


async def test_closing_the_stream_right_after_the_report_stops_vllms_generate():
    log: list[str] = []
    stream = _with_report(fake_outputs([5.0], log), report_after(0.0))
    assert isinstance(await anext(stream), KVLoadReport)  # vLLM's next output is awaited meanwhile
    await stream.aclose()
    assert log == ["CancelledError"]
