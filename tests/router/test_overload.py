"""Overload: bounded queues and 429 + Retry-After instead of unbounded latency, on a real `pdserve up --engine mock`.

Three systems, each made slow where the test needs it (PDSERVE_* variables reach every service `pdserve up`
starts): the router's in-flight cap, every decode worker refusing beyond --max-queue, and a prefill queue
longer than the request timeout. Each test also shows the same request is served once the load is gone.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, free_port, get_json

pytestmark = pytest.mark.e2e


def start_up(tmp_path_factory, name: str, env: dict[str, str]) -> PdserveUp:
    up = PdserveUp(tmp_path_factory.mktemp(name), free_port(), env=env)
    up.wait_ready(1, 1)
    return up


def stop_up(up: PdserveUp) -> None:
    up.stop()
    assert not up.kill_leftovers()


def completion(base_url: str, prompt: str = "Hello", max_tokens: int = 4, timeout_s: float = 60,
               stream: bool = False) -> httpx.Response:
    body = {"model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=timeout_s)


class Background:
    """Requests sent from threads; `responses` collects their answers (or exceptions)."""

    def __init__(self, base_url: str, count: int, **request):
        self.responses: list[httpx.Response | Exception] = []
        self._threads = [threading.Thread(target=self._send, args=(base_url,), kwargs=request, daemon=True)
                         for _ in range(count)]
        for t in self._threads:
            t.start()

    def _send(self, base_url: str, **request) -> None:
        try:
            self.responses.append(completion(base_url, **request))
        except Exception as e:  # reported by the test through `responses`
            self.responses.append(e)

    def join(self, timeout_s: float = 60) -> list[httpx.Response | Exception]:
        for t in self._threads:
            t.join(timeout_s)
        return self.responses


def assert_429(r: httpx.Response, contains: str) -> dict:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "overloaded", error
    assert contains in error["message"], error["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-request-id"]
    return error


def wait_for(predicate, timeout_s: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker(up: PdserveUp, role: str) -> dict:
    _, health = get_json(f"{up.base_url}/health")
    return next(w for w in health["workers"] if w["role"] == role)


# ------------------------------------------------------------------------------------ router in-flight cap


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """At most 2 requests in the router; decode takes 100 ms a token."""
    up = start_up(tmp_path_factory, "capped", {"PDSERVE_MAX_INFLIGHT": "2", "PDSERVE_MOCK_MS_PER_DECODE_STEP": "100"})
    yield up
    stop_up(up)


def test_router_inflight_cap_answers_429_at_once(capped):
    busy = Background(capped.base_url, 2, max_tokens=30)  # ~3 s each
    wait_for(lambda: worker(capped, "decode")["num_running"] == 2, what="both requests decoding")
    for stream in (False, True):
        started = time.monotonic()
        r = completion(capped.base_url, stream=stream)
        assert time.monotonic() - started < 1.0  # refused at once, not queued behind the others
        assert_429(r, "limit of 2 requests")
    status, health = get_json(f"{capped.base_url}/health")  # not a completion: never refused
    assert status == 200 and health["status"] == "ok"
    answers = busy.join()
    assert [r.status_code for r in answers] == [200, 200], answers
    r = completion(capped.base_url)  # the slots were given back
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------ every worker full


@pytest.fixture(scope="module")
def full_workers(tmp_path_factory):
    """Each worker takes one request at a time (--max-queue 1); decode takes 100 ms a token."""
    up = start_up(tmp_path_factory, "full", {"PDSERVE_MAX_QUEUE": "1", "PDSERVE_MOCK_MS_PER_DECODE_STEP": "100"})
    yield up
    stop_up(up)


def test_every_decode_worker_full_is_429_not_5xx(full_workers):
    busy = Background(full_workers.base_url, 1, max_tokens=30)
    wait_for(lambda: worker(full_workers, "decode")["num_running"] == 1, what="the decode worker busy")
    r = completion(full_workers.base_url)
    assert_429(r, "Every decode worker is full")
    # Nothing is left held for the refused request: prefill gave its KV back when decode refused.
    wait_for(lambda: worker(full_workers, "prefill")["kv_usage"] == 0, what="prefill to free the refused KV")
    answers = busy.join()
    assert [a.status_code for a in answers] == [200], answers
    r = completion(full_workers.base_url)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def small_kv(tmp_path_factory):
    """8 KV blocks of 32 tokens per worker (a 200-token prompt takes 7); decode takes 100 ms a token."""
    up = start_up(tmp_path_factory, "smallkv", {"PDSERVE_NUM_KV_BLOCKS": "8", "PDSERVE_MAX_MODEL_LEN": "256",
                                                "PDSERVE_MOCK_MS_PER_DECODE_STEP": "100"})
    yield up
    stop_up(up)


def test_a_decode_worker_whose_kv_cache_is_full_is_429_not_5xx(small_kv):
    """The decode worker accepts the request, then its engine has no room for the prompt's KV: an overload (the
    chunk's error_code kv_full), answered as one, not as a failed upstream."""
    busy = Background(small_kv.base_url, 1, prompt="a" * 200, max_tokens=30)
    wait_for(lambda: worker(small_kv, "decode")["num_running"] == 1, what="the decode worker busy")
    r = completion(small_kv.base_url, prompt="b" * 200)
    assert_429(r, "Every decode worker is full")
    answers = busy.join()
    assert [a.status_code for a in answers] == [200], answers
    r = completion(small_kv.base_url, prompt="b" * 200)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------ deadline cannot be met


@pytest.fixture(scope="module")
def slow_prefill(tmp_path_factory):
    """A prompt of 200 byte tokens takes the one prefill worker 2 s; every request must end within 5 s."""
    # The same prompt each time, computed anew each time: no prefix cache (on by default) to answer it at once.
    up = start_up(tmp_path_factory, "slowprefill", {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": "10",
                                                    "PDSERVE_PREFIX_CACHING": "0", "PDSERVE_REQUEST_TIMEOUT_S": "5"})
    yield up
    stop_up(up)


def test_request_whose_deadline_cannot_be_met_is_refused_at_once(slow_prefill):
    prompt = "x" * 200
    started = time.monotonic()
    r = completion(slow_prefill.base_url, prompt)  # teaches the router how long a prefill takes (~2 s)
    assert r.status_code == 200 and time.monotonic() - started > 1.9, r.text
    # 3 prefills in the one queue: 6 s of work, more than the 5 s a new request has.
    queue = Background(slow_prefill.base_url, 3, prompt=prompt)
    time.sleep(0.5)  # all three sent; the first ends at ~2 s, so the queue stays 3 long until then
    started = time.monotonic()
    r = completion(slow_prefill.base_url, prompt)
    assert time.monotonic() - started < 0.5  # refused before any work, not after waiting out its 5 s
    assert_429(r, "The prefill queue is about 6")
    queue.join()
    r = completion(slow_prefill.base_url, prompt)  # the queue drained: the same request is served
    assert r.status_code == 200, r.text


def test_early_refusal_can_be_turned_off(tmp_path_factory):
    """--no-early-refusal: the same overload waits instead, and ends in the request's own timeout."""
    up = start_up(tmp_path_factory, "norefusal", {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": "10", "PDSERVE_PREFIX_CACHING": "0",
                                                  "PDSERVE_REQUEST_TIMEOUT_S": "5", "PDSERVE_EARLY_REFUSAL": "0"})
    try:
        prompt = "x" * 200
        assert completion(up.base_url, prompt).status_code == 200
        queue = Background(up.base_url, 3, prompt=prompt)
        time.sleep(0.5)
        started = time.monotonic()
        r = completion(up.base_url, prompt)
        assert r.status_code == 504 and time.monotonic() - started > 4, r.text
        queue.join()
    finally:
        stop_up(up)
