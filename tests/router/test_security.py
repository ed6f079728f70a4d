"""Router security: API keys (file and environment, through `pdserve up`), body limits, no internals in errors.

The API-key and body-limit tests run against a real `pdserve up --engine mock` with keys from both sources;
the 500 test uses the in-process app with a backend that fails in a way only a bug would.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time

import httpx
import openai
import pytest

from pdserve import config as cfg
from pdserve.config import MOCK_MODEL
from services.router.api import create_app
from services.router.auth import ApiKeys
from tests.e2e.conftest import PdserveUp, Service, free_port, get_json
from tests.router.test_api import FakeBackend, chat_body, completion_body

FILE_KEY = "sk-file-0123456789abcdef"
ENV_KEY = "sk-env-fedcba9876543210"
LIMIT = 64 * 1024


def openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """`pdserve up` with one key in a file (with comments) and one in PDSERVE_API_KEYS, and a small body limit."""
    tmp = tmp_path_factory.mktemp("keyed")
    keys_file = tmp / "api-keys"
    keys_file.write_text(f"# production keys\n\n{FILE_KEY}   # the CI key\n")
    up = PdserveUp(tmp, free_port(), "--api-keys-file", str(keys_file),
                   env={"PDSERVE_API_KEYS": ENV_KEY, "PDSERVE_MAX_BODY_BYTES": str(LIMIT)})
    with up.running(1, 1):
        yield up


@pytest.mark.e2e
@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", f"Bearer {FILE_KEY}x", f"Basic {FILE_KEY}",
                                           FILE_KEY, "Bearer", f"Bearer {FILE_KEY[:-1]}"])
def test_missing_or_wrong_key_is_401(keyed, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    with httpx.Client(base_url=keyed.base_url, headers=headers, timeout=10) as c:
        for r in (c.post("/v1/chat/completions", json=chat_body(model=MOCK_MODEL)), c.get("/v1/models"),
                  c.get(f"/v1/models/{MOCK_MODEL}")):
            error = openai_error(r, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error"
            assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
            assert ("didn't provide" if authorization is None else "Incorrect API key") in error["message"]
            assert FILE_KEY not in r.text and ENV_KEY not in r.text


@pytest.mark.e2e
@pytest.mark.parametrize("key", [FILE_KEY, ENV_KEY], ids=["from-file", "from-env"])
def test_right_key_is_served(keyed, key):
    client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    r = client.chat.completions.create(model=MOCK_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == [MOCK_MODEL]


@pytest.mark.e2e
def test_openai_client_with_a_wrong_key_gets_an_authentication_error(keyed):
    client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model=MOCK_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


@pytest.mark.e2e
def test_health_metrics_and_docs_stay_open(keyed):
    status, health = get_json(f"{keyed.base_url}/health")
    assert status == 200 and health["status"] == "ok"
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{keyed.base_url}{path}", timeout=10).status_code == 200, path


@pytest.mark.e2e
def test_keys_are_not_on_any_command_line(keyed):
    """The env key reaches the router through its environment; nothing puts a key into argv (ps shows argv)."""
    for pid in {keyed.process.pid, *keyed.children_seen}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
        except OSError:
            continue
        assert FILE_KEY not in argv and ENV_KEY not in argv


def raw_request(port: int, head: str, body: bytes = b"", read_s: float = 5.0) -> tuple[int, bytes, float]:
    """Sends head + body on a plain socket without finishing a declared body; (status, response, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) == 0:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data, time.monotonic() - started


@pytest.mark.e2e
def test_declared_oversize_body_is_413_before_it_is_sent(keyed):
    """Content-Length over the limit: 413 at once, although not one byte of the body was sent."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FILE_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * LIMIT}\r\n\r\n")
    status, response, seconds = raw_request(keyed.port, head)
    assert status == 413 and b'"payload_too_large"' in response and seconds < 3


@pytest.mark.e2e
def test_unauthenticated_body_is_not_read(keyed):
    """Without a key the answer is 401 before any of a (declared huge) body is read."""
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * LIMIT}\r\n\r\n")
    status, response, seconds = raw_request(keyed.port, head)
    assert status == 401 and b'"invalid_api_key"' in response and seconds < 3


@pytest.mark.e2e
def test_chunked_oversize_body_is_413(keyed):
    """No Content-Length (chunked transfer encoding): the limit is counted while reading."""
    def chunks():
        yield b'{"model": "' + MOCK_MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(2 * LIMIT // 4096):
            yield b"x" * 4096
        yield b'"}]}'

    r = httpx.post(f"{keyed.base_url}/v1/chat/completions", content=chunks(), timeout=10,
                   headers={"Authorization": f"Bearer {FILE_KEY}", "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    error = openai_error(r, 413, "payload_too_large")
    assert str(LIMIT) in error["message"]
    # Just under the limit is parsed and served (it is a 400 for its nonsense field only, not a 413).
    small = chat_body("x" * (LIMIT // 2), model=MOCK_MODEL, max_tokens=2, temperature=-1)
    r = httpx.post(f"{keyed.base_url}/v1/chat/completions", json=small, timeout=10,
                   headers={"Authorization": f"Bearer {FILE_KEY}"})
    openai_error(r, 400)


async def test_internal_error_body_has_no_traceback_or_paths(caplog):
    """A bug deep inside (here: the backend raising a plain exception naming a file) is a 500 that names the
    request id and nothing else; the details go to the log."""
    backend = FakeBackend()
    secret = 'File "/srv/pdserve/services/router/secret_module.py", line 42, in generate'

    def explode(*_):
        raise RuntimeError(secret)

    backend.fail_at, backend.failure = 0, RuntimeError(secret)
    app = create_app(backend)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
        responses = [await c.post("/v1/chat/completions", json=chat_body(stream=stream)) for stream in (False, True)]
        backend.tokenizer = explode  # fails while the request is prepared, outside the generation
        responses.append(await c.post("/v1/completions", json=completion_body()))
        backend.models = explode  # fails in a plain route
        responses.append(await c.get("/v1/models"))
    for r in responses:
        error = openai_error(r, 500, "internal_error")
        assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
        for leak in ("Traceback", "secret_module", ".py", "/srv/", "RuntimeError", "line 42"):
            assert leak not in r.text, (leak, r.text)
    assert sum(secret in (rec.exc_text or "") for rec in caplog.records if rec.levelno >= logging.ERROR) >= 4


# ------------------------------------------------------------------------------------ config and keys


def test_keys_come_from_file_and_environment(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nk-one\n\n  k-two  # note\n#k-off\n")
    router = cfg.build(cfg.RouterConfig, {"api_keys_file": str(keys_file)}, env={"PDSERVE_API_KEYS": "k-three, k-four,"})
    assert router.api_key_set == {"k-one", "k-two", "k-three", "k-four"}
    assert "k-three" not in repr(router)  # secrets stay out of logs and tracebacks
    assert cfg.build(cfg.RouterConfig, {}, env={}).api_key_set == frozenset()


def test_api_keys_have_no_command_line_flag():
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, cfg.RouterConfig)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--api-keys-file" in flags and "--api-keys" not in flags


@pytest.mark.parametrize("content, env, message", [
    ("# only a comment\n\n", {}, "holds no key"),
    (None, {}, "cannot read"),
    ("k\n", {"PDSERVE_API_KEYS": " , "}, "PDSERVE_API_KEYS"),
])
def test_bad_key_settings_stop_the_router_at_start(tmp_path, content, env, message):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.build(cfg.RouterConfig, {"api_keys_file": str(path)}, env=env)


def test_api_keys_compare():
    keys = ApiKeys(["alpha", "beta-longer-key"])
    assert keys.allows("Bearer alpha") and keys.allows("bearer beta-longer-key") and keys.allows("Bearer  alpha ")
    for header in (None, "", "alpha", "Bearer", "Bearer alph", "Bearer alphaa", "Token alpha", "Bearer beta"):
        assert not keys.allows(header), header
    assert keys.protects("/v1/chat/completions") and keys.protects("/v1")
    assert not any(keys.protects(p) for p in ("/health", "/metrics", "/docs", "/openapi.json", "/v10"))


def test_router_on_all_interfaces_without_keys_warns(nats, tmp_path):
    port = free_port()
    router = Service(["router", "--nats", nats.url, "--host", "0.0.0.0", "--port", str(port)],
                     str(tmp_path / "router.log"))
    try:
        deadline = time.monotonic() + 30
        while "OpenAI API on" not in router.output() and time.monotonic() < deadline:
            assert router.process.poll() is None, router.output()
            time.sleep(0.1)
        time.sleep(0.2)
        lines = [line for line in router.output().splitlines() if "without API keys" in line]
        assert len(lines) == 1 and " WARNING " in lines[0] and "PDSERVE_API_KEYS" in lines[0], router.output()
    finally:
        router.stop()
