"""The host-memory KV tier end to end: `pdserve up --engine mock --prefill 1 --decode 1 --kv-host-cache-gib 0.1`
with an engine cache of 48 blocks. A long prefix is computed, then pushed out of the engine's cache by another long
prompt; the next request with that prefix gets its blocks copied back from host memory instead of computing them:
the answer is the one computing gives, the worker counts the tokens (stats and /metrics), the broker's index kept
the blocks as the worker's "host tier" (the router's route line says how many), and it is faster by the compute.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.conftest import PdserveUp, free_port, get_json
from tests.e2e.test_lost_work import expected, worker_stats
from tests.e2e.test_prefix_reuse import ask

pytestmark = pytest.mark.e2e

MS_PER_PROMPT_TOKEN = 1.0
BLOCK_SIZE = 32
PREFIX = "You are a helpful assistant who answers in one short sentence. " * 16  # 1,008 tokens: 31 full blocks
FLUSH = "An unrelated and rather long request that fills the engine's cache. " * 21  # 1,428 tokens: 45 blocks
HOST_LINE = re.compile(r"blocks cached, (\d+) in host memory\)")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(MS_PER_PROMPT_TOKEN), "PDSERVE_NUM_KV_BLOCKS": "48",
           "PDSERVE_MAX_MODEL_LEN": "1536"}
    with PdserveUp(tmp_path_factory.mktemp("hosttier"), free_port(), "--prefill", "1", "--decode", "1",
                   "--kv-host-cache-gib", "0.1", env=env).running(1, 1) as up:
        yield up


async def test_a_prefix_pushed_out_of_the_engine_cache_is_copied_back_from_host_memory(system):
    first = PREFIX + "What is the capital of France?"
    text, first_s = await ask(system, first)
    assert text == expected(first, 8)
    text, _ = await ask(system, FLUSH)  # 45 blocks of 48: most of the prefix's 31 cached blocks evicted
    assert text == expected(FLUSH, 8)
    (before,) = await worker_stats(system, "prefill")
    assert before.num_host_tier_blocks >= 25, before
    time.sleep(1.0)  # the prefill worker's KV events reach the broker's index

    second = PREFIX + "And what is the capital of Italy?"
    text, second_s = await ask(system, second)
    assert text == expected(second, 8)
    (after,) = await worker_stats(system, "prefill")
    loaded = after.num_prefix_host_loaded_tokens - before.num_prefix_host_loaded_tokens
    assert loaded >= 25 * BLOCK_SIZE, after
    computed = after.num_computed_prompt_tokens - before.num_computed_prompt_tokens
    assert computed <= len(second) - loaded, (computed, loaded)
    # Computing the prefix costs ~1 s here; copying it back from host memory, milliseconds.
    assert second_s < first_s - 0.5, (first_s, second_s)
    assert max(int(n) for n in HOST_LINE.findall(system.output())) >= 25  # the broker said where the blocks were

    _, health = get_json(f"{system.base_url}/health")
    (address,) = [w["metrics_address"] for w in health["workers"] if w["role"] == "prefill"]
    async with httpx.AsyncClient(timeout=10) as http:
        metrics = (await http.get(address)).text
    (value,) = re.findall(r"^pdserve_prefix_host_loaded_tokens_total\{[^}]*\} (\S+)$", metrics, re.M)
    assert float(value) >= loaded
    (blocks,) = re.findall(r"^pdserve_kv_host_tier_blocks\{[^}]*\} (\S+)$", metrics, re.M)
    assert float(blocks) >= 1
    assert "host-memory KV tier of" in system.output() and "empty at start" in system.output()
