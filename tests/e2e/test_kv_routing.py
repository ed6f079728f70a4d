"""KV-aware routing end to end: `pdserve up --engine mock --prefill 2 --decode 2` (prefix caching: on by default).

The router asks the KV broker which workers hold a prompt's blocks and weighs that against load; the route it
chose is in its log line (`request ID: route REASON: prefill P (M of N blocks cached, H in host memory), decode D
(M cached); kv lookup STATUS`), which these tests read by request id (the X-Request-Id header of each response).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time

import httpx
import pytest

from pdserve import nats_server, subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.kv.hashing import block_hashes
from pdserve.protocol import KVLookup, KVLookupReply, SamplingParams
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, free_port, frozen, get_json, service_pids, thaw_and_stop

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32  # WorkerConfig's default
LOCAL_PREFILL_MAX_TOKENS = 48
PREFILL_QUEUE_LIMIT = 2
PREFIX = "Shared system prompt: you are a helpful assistant who answers briefly. " * 10  # ~22 blocks
ROUTE_LINE = re.compile(r"request (\S+): route (\w+): prefill (.+?) "
                        r"\((\d+) of (\d+) blocks cached, \d+ in host memory\), "
                        r"decode (\S+) \((\d+) cached\); kv lookup (\w+)")


def question(i: int) -> str:
    return f" Question {i}: " + "how do prefix caches and block hashes work together? " * 3  # ~170 tokens


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kvrouting")
    nats = nats_server.start(store_dir=str(tmp / "nats"), die_with_parent=True)
    env = {"PDSERVE_LOCAL_PREFILL_MAX_TOKENS": str(LOCAL_PREFILL_MAX_TOKENS),
           "PDSERVE_PREFILL_QUEUE_LIMIT": str(PREFILL_QUEUE_LIMIT), "PDSERVE_ROUTING": "kv"}
    up = PdserveUp(tmp, free_port(), "--nats", nats.url, "--prefill", "2", "--decode", "2", env=env)
    try:
        up.wait_ready(2, 2)
        yield up
    finally:
        thaw_and_stop(up)
        nats.stop()


def expected(prompt: str, max_tokens: int) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


def complete(up: PdserveUp, prompt: str, max_tokens: int = 4) -> dict:
    """Serve prompt, check its text, return its route (from the router's log line)."""
    r = httpx.post(f"{up.base_url}/v1/completions", timeout=60,
                   json={"model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(prompt, max_tokens)
    return route_of(up, r.headers["x-request-id"])


def route_of(up: PdserveUp, request_id: str) -> dict:
    for match in ROUTE_LINE.finditer(up.output()):
        if match[1] == request_id:
            return {"reason": match[2], "prefill": None if match[3].startswith("none") else match[3],
                    "prefill_matched": int(match[4]), "num_blocks": int(match[5]), "decode": match[6],
                    "decode_matched": int(match[7]), "kv_lookup": match[8]}
    raise AssertionError(f"no route line for {request_id}")


def lookup(up: PdserveUp, prompt: str) -> dict[str, int]:
    async def ask() -> dict[str, int]:
        bus = await Bus.connect(up.nats_url, "test-kv-routing")
        try:
            hashes = tuple(block_hashes(ByteTokenizer().encode(prompt), BLOCK_SIZE))
            reply = await bus.request(subjects.KV_LOOKUP, KVLookup(model=MOCK_MODEL, block_hashes=hashes),
                                      KVLookupReply, timeout_s=1)
            return reply.num_matched_blocks
        finally:
            await bus.close()
    return asyncio.run(ask())


def wait_indexed(up: PdserveUp, prompt: str, worker_ids: set[str], num_blocks: int, timeout_s: float = 10) -> None:
    """Until the broker answers that every worker in worker_ids holds num_blocks leading blocks of prompt."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = lookup(up, prompt)
        if all(held.get(w, 0) >= num_blocks for w in worker_ids):
            return
        assert time.monotonic() < deadline, f"broker index: {held}, wanted {worker_ids} x {num_blocks} blocks"
        time.sleep(0.1)


def metric_value(up: PdserveUp, series: str) -> float:
    """One series' value from the router's /metrics ('name' or 'name{labels}' as printed); 0 when absent."""
    for line in httpx.get(f"{up.base_url}/metrics", timeout=5).text.splitlines():
        if line.split(" ")[0] == series:
            return float(line.split()[1])
    return 0.0


def test_requests_sharing_a_long_prefix_are_prefilled_where_it_is_cached(system):
    first = complete(system, PREFIX + question(0))
    assert first["kv_lookup"] == "ok" and first["reason"] == "load" and first["prefill"] is not None
    num_prefix_blocks = len(ByteTokenizer().encode(PREFIX)) // BLOCK_SIZE
    wait_indexed(system, PREFIX, {first["prefill"], first["decode"]}, num_prefix_blocks)
    cached_before = metric_value(system, "pdserve_prompt_cached_tokens_total")
    for i in range(1, 5):
        route = complete(system, PREFIX + question(i))
        # ~170 tokens left after any decode worker's hit (> LOCAL_PREFILL_MAX_TOKENS): prefilled on P
        assert route["reason"] == "prefix_hit", route
        assert route["prefill"] == first["prefill"], route
        assert route["prefill_matched"] >= num_prefix_blocks, route
    # the prefill worker really found the prefix in its cache
    assert metric_value(system, "pdserve_prompt_cached_tokens_total") - cached_before >= 4 * num_prefix_blocks * BLOCK_SIZE


def test_a_prompt_cached_whole_on_a_decode_worker_goes_straight_there(system):
    prompt = PREFIX + question(7)
    first = complete(system, prompt)
    num_blocks = len(ByteTokenizer().encode(prompt)) // BLOCK_SIZE
    wait_indexed(system, prompt, {first["decode"]}, num_blocks)
    local_before = metric_value(system, "pdserve_local_prefills_total")
    again = complete(system, prompt)
    assert again["reason"] == "cache_hit" and again["prefill"] is None, again
    assert again["decode"] == first["decode"] and again["decode_matched"] == num_blocks, again
    assert metric_value(system, "pdserve_local_prefills_total") == local_before + 1
    assert metric_value(system, 'pdserve_route_decisions_total{reason="cache_hit"}') >= 1


def test_a_short_rest_after_the_decode_workers_hit_is_prefilled_by_decode(system):
    prompt = PREFIX + question(8)
    first = complete(system, prompt)
    num_tokens = len(ByteTokenizer().encode(prompt))
    wait_indexed(system, prompt, {first["decode"]}, num_tokens // BLOCK_SIZE)
    # one block more than the decode worker holds plus 5 tokens: 37 tokens left to compute there (< 48)
    longer = prompt + "z" * (BLOCK_SIZE - num_tokens % BLOCK_SIZE + 5)
    route = complete(system, longer)
    assert route["reason"] == "local_prefill" and route["prefill"] is None, route
    assert route["decode"] == first["decode"] and route["decode_matched"] == num_tokens // BLOCK_SIZE, route
    # the same rest as a fresh prompt (nothing cached) is far over the threshold: prefilled on P
    fresh = complete(system, "Unrelated " + longer[10:][::-1])
    assert fresh["reason"] == "load" and fresh["prefill"] is not None, fresh


def test_an_unrelated_request_goes_to_the_least_loaded_decode_worker(system):
    # ~8 s of decoding at the mock's 2 ms per token: busy still decodes while the others are routed, even on a
    # loaded CI machine (2000 tokens once ended before the last of them there).
    body = {"model": MOCK_MODEL, "prompt": "a long story", "max_tokens": 3900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{system.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        busy = route_of(system, r.headers["x-request-id"])["decode"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it streams: busy is decoding it
        for i in range(3):
            route = complete(system, f"{i}: nothing like the others (its first block differs): " + "lorem ipsum dolor sit amet " * 4)
            assert route["reason"] == "load" and route["decode_matched"] == 0, route
            assert route["decode"] != busy, route


def test_with_every_prefill_queue_full_decode_prefills_locally(system):
    prefill = service_pids(system, "prefill-worker")
    assert len(prefill) == 2
    prompts = [f"waiting behind a frozen prefill worker {i}: " + "x" * 100 for i in range(2 * PREFILL_QUEUE_LIMIT)]
    decided = metric_value(system, 'pdserve_route_decisions_total{reason="load"}')
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        with frozen(prefill):
            waiting = [pool.submit(complete, system, p) for p in prompts]
            deadline = time.monotonic() + 2  # well within 3 missed heartbeats: the frozen workers still count
            while metric_value(system, 'pdserve_route_decisions_total{reason="load"}') < decided + len(prompts):
                assert time.monotonic() < deadline, "the waiting requests were not routed"
                time.sleep(0.02)
            start = time.monotonic()
            route = complete(system, "served while every prefill queue is full: " + "y" * 100)
            assert time.monotonic() - start < 1.5  # not a prefill deadline
            assert route["reason"] == "prefill_queues_full" and route["prefill"] is None, route
        for future in waiting:  # served once prefill thaws (or by decode after retries)
            assert future.result(timeout=60)["reason"] == "load"


def test_without_a_broker_answer_routing_falls_back_to_load(system):
    brokers = service_pids(system, "kv-broker")
    assert len(brokers) == 1
    prompt = PREFIX + question(0)  # cached: with a broker answer it would be a prefix hit
    with frozen(brokers):  # < 3 heartbeats: still a live member, its answer never comes
        start = time.monotonic()
        route = complete(system, prompt)
        elapsed = time.monotonic() - start
    assert route["kv_lookup"] == "timeout" and route["reason"] == "load", route
    assert route["prefill_matched"] == route["decode_matched"] == 0, route
    assert elapsed < 1.5  # the 0.2 s lookup deadline, then served
    _, health = get_json(f"{system.base_url}/health")
    assert health["status"] == "ok"
