"""Prefix reuse across workers (services/router/prefix_reuse.py): `pdserve up --engine mock --prefill 2 --decode 1`
with PDSERVE_ROUTING=round_robin, so that the second request sharing a long prefix goes to the prefill worker that does not
hold it. That worker pulls the prefix from the other one's cache instead of computing it; the answers are the ones
computing gives. With the holder frozen (SIGSTOP) its lease does not come and the prefix is computed, in time.
A decode worker that prefills a request itself (the prefill worker's queue is full) pulls the prefix from the
prefill worker's cache the same way. Every lease is released: no block stays held once the requests ended.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.conftest import PdserveUp, free_port, frozen, service_pids, stream_completion
from tests.e2e.test_lost_work import expected, worker_stats

pytestmark = pytest.mark.e2e

MS_PER_PROMPT_TOKEN = 2.0  # a 1,000-token prefix costs 2 s to compute; pulled over shm, a few ms
PREFIX = "You are a helpful assistant who answers in one short sentence. " * 16  # ~1,000 byte tokens


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(MS_PER_PROMPT_TOKEN), "PDSERVE_ROUTING": "round_robin"}
    with PdserveUp(tmp_path_factory.mktemp("prefixreuse"), free_port(), "--prefill", "2", "--decode", "1",
                   env=env).running(2, 1) as up:
        yield up


async def prefill_stats(up: PdserveUp) -> dict:
    return {s.worker_id: s for s in await worker_stats(up, "prefill")}


async def ask(up: PdserveUp, prompt: str) -> tuple[str, float]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        text = await stream_completion(http, up.base_url, prompt, 8)
    return text, time.monotonic() - started


async def wait_prefill_idle(up: PdserveUp, within_s: float) -> dict:
    """Every prefill worker with no block held (leases released, KV handed over), within within_s."""
    deadline = time.monotonic() + within_s
    while True:
        stats = await prefill_stats(up)
        if all(s.num_held_blocks == 0 and s.num_running == 0 for s in stats.values()):
            return stats
        assert time.monotonic() < deadline, f"blocks still held on prefill workers: {stats}"
        time.sleep(0.1)


async def test_the_other_worker_pulls_a_cached_prefix_instead_of_computing_it(system):
    first = PREFIX + "What is the capital of France?"
    text, first_s = await ask(system, first)
    assert text == expected(first, 8)
    before = await wait_prefill_idle(system, 10)
    holder = max(before.values(), key=lambda s: s.num_requests_served).worker_id
    time.sleep(1.0)  # the holder's KV events reach the broker's index

    second = PREFIX + "And what is the capital of Italy?"
    text, second_s = await ask(system, second)
    assert text == expected(second, 8)
    after = await wait_prefill_idle(system, 10)  # the lease on the holder is released too
    other = next(w for w in after if w != holder)
    assert after[other].num_requests_served == before[other].num_requests_served + 1, "round robin went elsewhere"
    loaded = after[other].num_prefix_peer_loaded_tokens - before[other].num_prefix_peer_loaded_tokens
    assert loaded >= len(PREFIX) - 64, f"{other} loaded {loaded} prompt tokens from {holder}'s cache"
    loaded_bytes = after[other].num_prefix_peer_loaded_bytes - before[other].num_prefix_peer_loaded_bytes
    assert loaded_bytes >= loaded // 32 * 32 * 23040  # whole blocks of the mock's KV: 23,040 bytes per token
    assert after[other].num_prefix_peer_load_failures == before[other].num_prefix_peer_load_failures
    # Computing the prefix takes len(PREFIX) x 2 ms = 2 s; pulling it, milliseconds.
    assert second_s < first_s - 1.0, (first_s, second_s)
    log = system.output()
    assert f"cached prefix blocks from {holder} instead of computing them" in log


async def test_a_frozen_holder_costs_only_the_compute(system):
    prefix = PREFIX.replace("helpful", "careful")  # cached nowhere yet (the first test left PREFIX on both)
    prompt = prefix + "Name a prime number."
    text, _ = await ask(system, prompt)
    assert text == expected(prompt, 8)
    before = await wait_prefill_idle(system, 10)
    time.sleep(1.0)
    served_last = max(before.values(), key=lambda s: s.num_requests_served)
    holder_pid = next(p for p in service_pids(system, "prefill-worker") if f"-{p}-" in served_last.worker_id)
    other = next(w for w in before if w != served_last.worker_id)

    again = prefix + "Name another prime number."
    with frozen([holder_pid]):
        # Round robin sends it to the other worker; the frozen holder's lease never comes (prefix_lease_timeout_s)
        text, seconds = await ask(system, again)
    assert text == expected(again, 8)
    assert seconds < 2 * len(prefix) * MS_PER_PROMPT_TOKEN / 1000 + 3, seconds
    after = await wait_prefill_idle(system, 10)
    assert after[other].num_requests_served == before[other].num_requests_served + 1
    assert after[other].num_prefix_peer_loaded_tokens == before[other].num_prefix_peer_loaded_tokens
    assert f"{served_last.worker_id} did not hold its cached prefix" in system.output()  # asked, and no answer came


@pytest.fixture(scope="module")
def busy_prefill(tmp_path_factory):
    """1P1D, each worker taking one request at a time (--max-queue 1)."""
    env = {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(MS_PER_PROMPT_TOKEN), "PDSERVE_MAX_QUEUE": "1"}
    with PdserveUp(tmp_path_factory.mktemp("prefixlocal"), free_port(), "--prefill", "1", "--decode", "1",
                   env=env).running(1, 1) as up:
        yield up


async def test_a_decode_worker_prefilling_locally_pulls_the_prefix_the_busy_prefill_worker_holds(busy_prefill):
    """The prefill worker caches a prefix (an answer of one token: nothing goes to decode, so only it holds the
    prefix), then computes a long unrelated prompt; meanwhile a request with that prefix finds its queue full, so
    the decode worker prefills it itself, pulling the prefix from the busy worker's cache instead of computing it."""
    up = busy_prefill
    async with httpx.AsyncClient(timeout=60) as http:
        first = PREFIX + "Say one word."
        assert await stream_completion(http, up.base_url, first, 1) == expected(first, 1)
        time.sleep(1.0)  # its KV events reach the broker's index
        (decode,) = await worker_stats(up, "decode")
        slow = "An unrelated long prompt keeps the prefill worker busy for seconds. " * 40  # ~2,700 tokens: ~5 s
        busy = asyncio.ensure_future(stream_completion(http, up.base_url, slow, 4))
        deadline = time.monotonic() + 5
        while not (await prefill_stats(up)).popitem()[1].num_held_blocks:  # the slow prompt's blocks
            assert time.monotonic() < deadline and not busy.done(), "the prefill worker never got busy"
            await asyncio.sleep(0.05)

        second = PREFIX + "And what is the capital of Italy?"
        started = time.monotonic()
        assert await stream_completion(http, up.base_url, second, 8) == expected(second, 8)
        seconds = time.monotonic() - started
        assert not busy.done(), "the slow prompt ended first: the prefill worker was not busy throughout"
        assert await busy == expected(slow, 4)
    (after,) = await worker_stats(up, "decode")
    assert after.num_local_prefills == decode.num_local_prefills + 1
    loaded = after.num_prefix_peer_loaded_tokens - decode.num_prefix_peer_loaded_tokens
    assert loaded >= len(PREFIX) - 64, after
    assert seconds < len(PREFIX) * MS_PER_PROMPT_TOKEN / 1000, seconds  # computing the prefix alone takes longer
    assert re.search(r"decode-\S+ pulls \d+ cached prefix blocks from prefill-", up.output())
    stats = await wait_prefill_idle(up, 10)  # the lease was released
    assert all(s.num_held_blocks == 0 for s in stats.values())
