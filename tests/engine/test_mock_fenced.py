"""The mock engine holds the blocks a failed nixl pull may still write into (engine/mock_fenced.py): its pulls READ
straight into the request's blocks, and when the prefill process freezes mid-pull, the request recomputes in other
blocks and answers right, while its own blocks stay out of use until the READs end.

Real processes: the prefill engine runs in a child process that the test freezes (SIGSTOP) and wakes (SIGCONT);
NIXL over UCX's TCP transport, as between hosts without RDMA NICs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pdserve.engine.base import KVLoadReport, TokenOutput
from pdserve.engine.mock import MockEngine, MockEngineConfig
from pdserve.engine.mock_model import predict
from pdserve.kv import nixl_path
from pdserve.protocol import KVLayout, KVTransferParams, ModelCard, SamplingParams
from tests.kv.ucx import UCX_TCP

pytestmark = pytest.mark.skipif(nixl_path.why_unavailable() is not None,
                                reason=f"NIXL does not load here: {nixl_path.why_unavailable()}")

# 4 MiB blocks: a prompt of 62 blocks is 248 MiB, four READs of 64 MiB, still moving when the prefill freezes
LAYOUT = KVLayout(num_layers=64, num_kv_heads=8, head_dim=128, dtype="mock16", dtype_bytes=2, block_size=16)
CARD = ModelCard(name="m", tokenizer="byte", max_model_len=2048, kv_layout=LAYOUT)
PROMPT = tuple(1 + i % 200 for i in range(62 * 16 - 3))
SAMPLING = SamplingParams(max_tokens=8, temperature=0)
NUM_BLOCKS = 160

PREFILL = """
import asyncio
from pdserve.engine.mock import MockEngine, MockEngineConfig
from tests.engine.test_mock_fenced import CARD, NUM_BLOCKS, PROMPT, SAMPLING

async def main():
    engine = MockEngine(MockEngineConfig(worker_id="p", card=CARD, num_kv_blocks=NUM_BLOCKS, ms_per_prompt_token=0,
                                         ms_per_decode_step=0, advertise_host="127.0.0.1", bind_host="127.0.0.1",
                                         kv_pull_timeout_s=2.0, kv_transport="nixl", offer_nixl=True))
    await engine.start()
    result = await engine.prefill("r1", PROMPT, SAMPLING, lease_s=120)
    print(result.kv_transfer_params.model_dump_json(), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.fixture
def prefill():
    """A prefill engine in its own process, holding PROMPT's KV for a pull: (process, KVTransferParams)."""
    proc = subprocess.Popen([sys.executable, "-c", PREFILL], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "UCX_TLS": UCX_TCP})
    try:
        line = proc.stdout.readline()
        assert line, "the prefill process ended before its KV was held"
        yield proc, KVTransferParams.model_validate_json(line)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
async def decode(monkeypatch):
    monkeypatch.setenv("UCX_TLS", UCX_TCP)
    engine = MockEngine(MockEngineConfig(
        worker_id="d", card=CARD, num_kv_blocks=NUM_BLOCKS, ms_per_prompt_token=0, ms_per_decode_step=0,
        advertise_host="127.0.0.1", bind_host="127.0.0.1", kv_pull_timeout_s=2.0, kv_transport="nixl"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def first_bytes(engine: MockEngine) -> np.ndarray:
    """The first byte of every block of the engine's pool (the mock's KV of a token is never all zeros)."""
    return np.array([engine._pool.segments(b)[0][0] for b in range(NUM_BLOCKS)])


async def test_a_frozen_prefill_mid_pull_recomputes_in_other_blocks_and_holds_its_own(prefill, decode):
    proc, params = prefill
    expected = predict(PROMPT, SAMPLING)
    outputs = []

    async def run():
        async for out in decode.generate("r1", PROMPT, SAMPLING, expected.token_ids[0], params):
            outputs.append(out)

    task = asyncio.create_task(run())
    until = time.monotonic() + 20
    while not first_bytes(decode).any():  # bytes of the pull land in the request's blocks
        assert not task.done(), task.exception()
        assert time.monotonic() < until, "no block landed within 20 s"
        await asyncio.sleep(0.001)
    os.kill(proc.pid, signal.SIGSTOP)
    landed = first_bytes(decode).nonzero()[0]
    await asyncio.wait_for(task, 30)

    report = next(o for o in outputs if isinstance(o, KVLoadReport))
    assert report.recomputed and "timeout_s=2.0" in report.error, report
    assert "".join(o.text for o in outputs if isinstance(o, TokenOutput)) == expected.text[1:]
    stats = decode.stats()
    assert stats["num_fenced_blocks"] == 62, stats  # the pull's blocks: READs into them may still land
    (fence, aside), = decode._fenced
    assert set(landed) <= set(aside) and not set(aside) & set(decode._free)
    assert not set(aside) & set(decode._cache.values())  # the recompute went into other blocks, cached now
    assert stats["num_held_blocks"] == 62  # cached blocks count as free, as in vLLM's pool

    os.kill(proc.pid, signal.SIGCONT)
    assert await asyncio.to_thread(fence.wait, 10.0), "the READs did not end once the prefill process ran again"
    outputs.clear()
    await run()  # the prefill still holds the KV: pulled again, now whole, straight into the blocks
    report = next(o for o in outputs if isinstance(o, KVLoadReport))
    assert not report.recomputed and report.transport == "nixl", report
    assert "".join(o.text for o in outputs if isinstance(o, TokenOutput)) == expected.text[1:]
    assert decode.stats()["num_fenced_blocks"] == 0  # free again once their READs ended
