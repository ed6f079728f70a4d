"""Out of the box, KV-aware routing follows a shared prefix: `pdserve up --engine mock --prefill 3 --decode 3`
with no PDSERVE_* variable, then 12 chat requests through the official openai client that share a long system
prompt. Workers keep a prefix cache by default, so the router sends them where the prefix already is; with
`--no-prefix-caching` nothing is cached and the same requests spread over the workers by load.

Where each request went is read as a user would: each worker's num_requests_served in the router's /health.
"""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest

from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, free_port, get_json
from tests.e2e.test_up import expected_chat

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32  # WorkerConfig's default
NUM_REQUESTS = 12
# 32 blocks with the byte tokenizer (one char, one token): holding them saves the router's weighing more than
# the two other requests in flight can cost on the worker that holds them (README: KV-aware routing).
SYSTEM_PROMPT = ("You are the support assistant of a small bakery. Answer in one short sentence. " * 13)[:32 * BLOCK_SIZE]


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Question {i}: when do you open?"}]


def served_by_role(up: PdserveUp) -> dict[str, list[int]]:
    """Requests each worker served, by role, highest first; once every worker's heartbeat counts all of them."""
    deadline = time.monotonic() + 10
    while True:
        _, health = get_json(f"{up.base_url}/health")
        served = {role: sorted((w["num_requests_served"] for w in health["workers"] if w["role"] == role), reverse=True)
                  for role in ("prefill", "decode")}
        if all(sum(counts) == NUM_REQUESTS for counts in served.values()) or time.monotonic() > deadline:
            return served
        time.sleep(0.2)


def serve_shared_prefix(tmp_path, *flags: str) -> dict[str, list[int]]:
    """Start `pdserve up` with 3 + 3 workers, send the first request alone (it fills a cache), then the other 11
    three at a time; each answer is checked against the mock engine. Where they went, by role."""
    up = PdserveUp(tmp_path, free_port(), "--prefill", "3", "--decode", "3", *flags)
    with up.running(3, 3):
        client = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0, timeout=30)

        def ask(i: int) -> None:
            r = client.chat.completions.create(model=MOCK_MODEL, messages=messages(i), max_tokens=8, temperature=0)
            assert r.choices[0].message.content == expected_chat(messages(i), max_tokens=8, temperature=0)[0]

        ask(0)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(ask, range(1, NUM_REQUESTS)))
        return served_by_role(up)


def test_a_shared_prefix_stays_on_one_worker_out_of_the_box(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_PREFIX_CACHING", raising=False)  # out of the box: nothing set
    served = serve_shared_prefix(tmp_path)
    assert sum(served["prefill"]) == sum(served["decode"]) == NUM_REQUESTS, served
    assert NUM_REQUESTS in served["prefill"] or NUM_REQUESTS in served["decode"], served


def test_without_prefix_caching_the_same_requests_spread(tmp_path, monkeypatch):
    """The contrast that shows the test above could fail: no cache, nothing to follow, load decides."""
    monkeypatch.delenv("PDSERVE_PREFIX_CACHING", raising=False)
    served = serve_shared_prefix(tmp_path, "--no-prefix-caching")
    assert sum(served["prefill"]) == sum(served["decode"]) == NUM_REQUESTS, served
    assert NUM_REQUESTS not in served["prefill"] and NUM_REQUESTS not in served["decode"], served
