"""End to end as a new user: `pdserve up --engine mock --prefill 2 --decode 2`, then the official openai client.

Every answer is checked against what the mock engine predicts for the exact prompt the router builds.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.protocol import SamplingParams
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, Service, alive, descendants, free_port, get_json

pytestmark = pytest.mark.e2e
TOKENIZER = ByteTokenizer()


def expected_chat(messages, **sampling) -> tuple[str, str]:
    prompt = TOKENIZER.encode(TOKENIZER.apply_chat_template(messages))
    p = predict(prompt, SamplingParams(**sampling))
    return p.text, p.finish_reason


def expected_completion(prompt: str, **sampling) -> tuple[str, str]:
    p = predict(TOKENIZER.encode(prompt), SamplingParams(**sampling))
    return p.text, p.finish_reason


@pytest.fixture(scope="module")
def client(system_2p2d):
    return openai.OpenAI(base_url=f"{system_2p2d.base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_non_streaming_matches_the_engine(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MOCK_MODEL, messages=messages, max_tokens=24, temperature=0)
    text, finish = expected_chat(messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish == "length"
    assert r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == len(TOKENIZER.apply_chat_template(messages).encode())


def test_chat_streaming_matches_the_engine(client):
    messages = [{"role": "user", "content": "Count to ten."}]
    stream = client.chat.completions.create(model=MOCK_MODEL, messages=messages, max_completion_tokens=40,
                                            temperature=0.9, seed=11, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    text, expected_finish = expected_chat(messages, max_tokens=40, temperature=0.9, seed=11)
    assert "".join(pieces) == text
    assert finish == expected_finish
    assert usage is not None and usage.completion_tokens == 40


def test_completions_both_ways_match_the_engine(client):
    prompt = "Once upon a time"
    r = client.completions.create(model=MOCK_MODEL, prompt=prompt, max_tokens=30, temperature=0.5, top_p=0.9, seed=3)
    text, finish = expected_completion(prompt, max_tokens=30, temperature=0.5, top_p=0.9, seed=3)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MOCK_MODEL, prompt=prompt, max_tokens=30, temperature=0.5, top_p=0.9, seed=3, stream=True) if c.choices)
    assert streamed == text


def test_stop_strings_and_single_token_requests(client):
    prompt = "The quick brown fox"
    full, _ = expected_completion(prompt, max_tokens=60, temperature=0)
    stop = full[20:22]
    r = client.completions.create(model=MOCK_MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    one = client.completions.create(model=MOCK_MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert (one.choices[0].text, one.choices[0].finish_reason) == (full[0], "length")


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MOCK_MODEL]


def test_every_worker_serves_some_of_20_requests(system_2p2d, client):
    for i in range(20):
        messages = [{"role": "user", "content": f"request {i}"}]
        r = client.chat.completions.create(model=MOCK_MODEL, messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == expected_chat(messages, max_tokens=8, temperature=0)[0]
    time.sleep(1.5)  # one heartbeat interval: /health shows heartbeat counters
    _, health = get_json(f"{system_2p2d.base_url}/health")
    served = {w["worker_id"]: w["num_requests_served"] for w in health["workers"]}
    assert len(served) == 4 and all(n > 0 for n in served.values()), served


BAD_INPUTS = [
    # (path, body or raw bytes, status, param or None)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": MOCK_MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, None),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, None),
    ("/v1/completions", {"model": MOCK_MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MOCK_MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MOCK_MODEL, "prompt": "x" * 5000}, 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_INPUTS)
def test_bad_input_gets_an_openai_error(system_2p2d, path, body, status, param):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(system_2p2d.base_url + path, timeout=10, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert param in (error.get("param") or "") or param in error["message"]
    assert "Traceback" not in r.text


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MOCK_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_no_live_worker_of_a_role_is_a_503_naming_it(tmp_path):
    """NATS, a broker, a router and only a prefill worker, each started on its own: decode is named missing."""
    from pdserve import nats_server

    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    port = free_port()
    services = [Service(["router", "--nats", nats.url, "--port", str(port)], str(tmp_path / "router.log")),
                Service(["prefill-worker", "--nats", nats.url], str(tmp_path / "prefill.log"))]
    try:
        deadline = time.monotonic() + 30
        while True:
            status, health = get_json(f"http://127.0.0.1:{port}/health")
            if health and any(w["role"] == "prefill" for w in health["workers"]):
                break
            assert time.monotonic() < deadline, services[0].output()
            time.sleep(0.2)
        assert status == 503 and health["status"] == "degraded"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MOCK_MODEL, "prompt": "hi"}, timeout=10)
        assert r.status_code == 503
        assert "decode" in r.json()["error"]["message"]
    finally:
        for s in services:
            s.stop()
        nats.stop()


def test_two_systems_side_by_side_do_not_collide(tmp_path, system_2p2d):
    """A second `pdserve up` with only another --port: both serve right, nothing crosses between them."""
    second = PdserveUp(tmp_path, free_port(), name="second")
    try:
        health2 = second.wait_ready(1, 1)
        _, health1 = get_json(f"{system_2p2d.base_url}/health")
        ids1 = {w["worker_id"] for w in health1["workers"]}
        ids2 = {w["worker_id"] for w in health2["workers"]}
        assert len(ids1) == 4 and len(ids2) == 2 and not ids1 & ids2
        addresses1 = {w["transfer_address"] for w in health1["workers"]}
        addresses2 = {w["transfer_address"] for w in health2["workers"]}
        assert not addresses1 & addresses2
        for base in (system_2p2d.base_url, second.base_url):
            c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
            r = c.completions.create(model=MOCK_MODEL, prompt="side by side", max_tokens=12, temperature=0)
            assert r.choices[0].text == expected_completion("side by side", max_tokens=12, temperature=0)[0]
    finally:
        second.stop()
        assert not second.kill_leftovers(), "processes left after the second pdserve up stopped"


def test_up_refuses_a_busy_port_with_the_fix(tmp_path, system_2p2d):
    busy = PdserveUp(tmp_path, system_2p2d.port, name="busy")
    busy.process.wait(timeout=30)
    assert busy.process.returncode != 0
    assert "in use" in busy.output() and "--port" in busy.output()


def test_kill_9_of_up_leaves_no_process(tmp_path):
    """Even when `pdserve up` itself is killed hard, its children go with it (parent-death signal)."""
    up = PdserveUp(tmp_path, free_port(), name="killed")
    up.wait_ready(1, 1)
    children = descendants(up.process.pid)
    assert len(children) >= 5  # nats-server, broker, router, prefill, decode
    up.process.kill()
    up.process.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    up.children_seen = children
    assert not up.kill_leftovers()
