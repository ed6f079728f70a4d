"""Deadlines everywhere: a stalled prefill, a stalled decode, a decode that stops mid-stream.

Real faults: the worker processes of a real `pdserve up` are frozen with SIGSTOP (a hung process keeps its
sockets open, the worst case for a waiter) and thawed with SIGCONT. Every request must end: a retry on
another worker with the right answer, or a clear error, never a hang.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.protocol import SamplingParams
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, free_port, frozen, get_json, service_pids, thaw_and_stop

pytestmark = pytest.mark.e2e

DEADLINES = {
    "PDSERVE_PREFILL_TIMEOUT_S": "1",
    "PDSERVE_DECODE_ACCEPT_TIMEOUT_S": "1",
    "PDSERVE_STREAM_IDLE_TIMEOUT_S": "1.5",
    "PDSERVE_MOCK_MS_PER_DECODE_STEP": "20",
}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deadlines")
    up = PdserveUp(tmp, free_port(), "--prefill", "2", "--decode", "2", env=DEADLINES)
    try:
        up.wait_ready(2, 2)
        yield up
    finally:
        thaw_and_stop(up)


def worker_pids(up: PdserveUp, role: str) -> list[int]:
    return service_pids(up, f"{role}-worker")


def complete(up: PdserveUp, prompt: str, max_tokens: int = 5) -> httpx.Response:
    return httpx.post(f"{up.base_url}/v1/completions", timeout=30,
                      json={"model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def expected(prompt: str, max_tokens: int = 5) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


def test_stalled_prefill_worker_is_retried_elsewhere(system):
    prefill = worker_pids(system, "prefill")
    assert len(prefill) == 2
    with frozen(prefill[:1]):
        for i in range(6):
            start = time.monotonic()
            r = complete(system, f"prefill stall {i}")
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected(f"prefill stall {i}")
            assert time.monotonic() - start < 5  # one prefill deadline (1 s) and a retry, not a hang


def test_every_prefill_stalled_means_decode_prefills_locally(system):
    with frozen(worker_pids(system, "prefill")):
        r = complete(system, "no prefill left", max_tokens=8)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected("no prefill left", 8)


def test_stalled_decode_worker_before_first_token_is_retried_elsewhere(system):
    decode = worker_pids(system, "decode")
    assert len(decode) == 2
    with frozen(decode[:1]):
        for i in range(6):
            start = time.monotonic()
            r = complete(system, f"decode stall {i}")
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected(f"decode stall {i}")
            assert time.monotonic() - start < 5


def test_decode_that_stops_mid_stream_ends_with_a_clear_error(system):
    decode = worker_pids(system, "decode")
    body = {"model": MOCK_MODEL, "prompt": "long story", "max_tokens": 500, "temperature": 0, "stream": True}
    events: list[dict | str] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{system.base_url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        stalled = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 5 and not stalled:
                stalled = True
                for pid in decode:
                    os.kill(pid, signal.SIGSTOP)
    try:
        elapsed = time.monotonic() - start
        assert events[-1] == "[DONE]"
        error = events[-2]
        assert "error" in error and "decode" in error["error"]["message"]
        assert elapsed < 10  # the 1.5 s idle deadline, not the 500-token stream nor a hang
        assert 5 <= len(events) - 2 < 500
    finally:
        for pid in decode:
            os.kill(pid, signal.SIGCONT)
    time.sleep(4)  # the thawed workers heartbeat again; the system serves as before
    r = complete(system, "after the storm")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("after the storm")


def serving_decode_pid(up: PdserveUp, timeout_s: float = 3.0) -> int:
    """The pid of the decode worker that heartbeats a running request (worker ids are role-host-PID-random)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, health = get_json(f"{up.base_url}/health")
        busy = [w for w in (health or {}).get("workers", []) if w["role"] == "decode" and w["num_running"] > 0]
        if len(busy) == 1:
            return int(busy[0]["worker_id"].split("-")[-2])
        time.sleep(0.1)
    raise AssertionError("no single decode worker reported the running request")


def test_decode_that_stops_mid_stream_resumes_on_another_worker_without_a_seam(system):
    """The client sees one stream: every token exactly once, in order, as if nothing happened."""
    body = {"model": MOCK_MODEL, "prompt": "resume me", "max_tokens": 150, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage, frozen_pid = "", None, None
    try:
        with httpx.stream("POST", f"{system.base_url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                if event["choices"]:
                    text += event["choices"][0]["text"]
                usage = event.get("usage") or usage
                if len(text) >= 10 and frozen_pid is None:
                    frozen_pid = serving_decode_pid(system)
                    os.kill(frozen_pid, signal.SIGSTOP)
        assert frozen_pid is not None
        assert text == expected("resume me", 150)
        assert usage["completion_tokens"] == 150 and usage["prompt_tokens"] == len(ByteTokenizer().encode("resume me"))
        metrics = httpx.get(f"{system.base_url}/metrics").text
        assert any(l.startswith("pdserve_decode_resumes_total ") and float(l.split()[1]) >= 1 for l in metrics.splitlines())
    finally:
        if frozen_pid is not None:
            os.kill(frozen_pid, signal.SIGCONT)
    time.sleep(4)  # the thawed worker heartbeats again


@pytest.fixture(scope="module")
def system_long_prefill_deadline(tmp_path_factory):
    """Production-like deadlines (a prefill may take long) and quick heartbeats: a dead worker is known long
    before its request's deadline."""
    env = {"PDSERVE_PREFILL_TIMEOUT_S": "30", "PDSERVE_DECODE_ACCEPT_TIMEOUT_S": "30",
           "PDSERVE_HEARTBEAT_INTERVAL_S": "0.5"}
    up = PdserveUp(tmp_path_factory.mktemp("long_prefill"), free_port(), "--prefill", "2", "--decode", "1", env=env)
    try:
        up.wait_ready(2, 1)
        yield up
    finally:
        thaw_and_stop(up)


def test_a_request_waiting_on_a_frozen_prefill_worker_moves_on_when_its_heartbeats_stop(system_long_prefill_deadline):
    """Not at the 30 s prefill deadline: once the worker missed 3 heartbeats (1.5 s) the router retries elsewhere."""
    system = system_long_prefill_deadline
    prompts = [f"waiting on a frozen worker {i}" for i in range(6)]
    with frozen(worker_pids(system, "prefill")[:1]), httpx.Client(timeout=30) as client:
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            responses = list(pool.map(lambda p: client.post(
                f"{system.base_url}/v1/completions",
                json={"model": MOCK_MODEL, "prompt": p, "max_tokens": 5, "temperature": 0}), prompts))
        elapsed = time.monotonic() - start
    for prompt, r in zip(prompts, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(prompt)
    metrics = httpx.get(f"{system.base_url}/metrics").text
    retried = sum(float(l.split()[1]) for l in metrics.splitlines() if l.startswith('pdserve_worker_retries_total{role="prefill"}'))
    assert retried >= 1  # some request did wait on the frozen worker
    assert elapsed < 6, elapsed  # 1.5 s of missed heartbeats and a retry, not the 30 s deadline
