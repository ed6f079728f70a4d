"""Bad input and idle peers at the router's edge, over real sockets to a real `pdserve up --engine mock`:

- text that cannot be encoded (a lone surrogate) is a 400 naming the field, not a 500;
- a request that would not fit in one NATS message is a 413 naming the limit, not a 500; `pdserve up`'s own
  NATS takes messages that fit long prompts;
- connections that send nothing, or trickle their headers, are closed within seconds; a 1 MiB header is a 431.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from pdserve import nats_server
from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, free_port

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 2.0
STOPS = ["s" * 300_000 + str(i) for i in range(4)]  # 1.2 MB of stop strings: over NATS' default 1 MiB


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"PDSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    with PdserveUp(tmp_path_factory.mktemp("edges"), free_port(), env=env).running(1, 1) as up:
        yield up


def post(up: PdserveUp, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(f"{up.base_url}{path}", content=content, json=None if content else body, timeout=30,
                      headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": "\\udfff"}]}]}', "messages[0].content"),
    ("/v1/completions", b'{"model": "M", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "M", "prompt": "ok", "stop": ["\\ud83d"]}', "stop"),
    ("/v1/completions", b'{"model": "M\\ud800", "prompt": "ok"}', "model"),
])
def test_text_that_cannot_be_encoded_is_a_400_naming_the_field(system, path, body, param):
    r = post(system, path, body.replace(b'"M', f'"{MOCK_MODEL}'.encode(), 1))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "cannot be encoded as UTF-8" in error["message"], error


def test_a_request_over_the_bus_max_payload_is_a_413_naming_the_limit(tmp_path, system):
    body = {"model": MOCK_MODEL, "prompt": "Hello", "max_tokens": 5, "stop": STOPS}
    # pdserve up's own NATS takes it (its max_payload fits long prompts) ...
    r = post(system, "/v1/completions", body)
    assert r.status_code == 200, r.text
    # ... a NATS with the default 1 MiB does not: 413, before any work
    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    try:
        with PdserveUp(tmp_path, free_port(), "--nats", nats.url, name="small").running(1, 1) as small:
            r = post(small, "/v1/completions", body)
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["code"] == "payload_too_large" and "max_payload of 1048576 bytes" in error["message"]
            assert post(small, "/v1/completions", {"model": MOCK_MODEL, "prompt": "Hello", "max_tokens": 5}
                        ).status_code == 200
            assert "Traceback" not in small.output()
    finally:
        nats.stop()


def open_connections(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        sock.recv(65536)
    except TimeoutError:
        return False
    except OSError:
        return True
    return True  # end of stream, or the router's last answer (408) before it closes


def wait_all_closed(socks: list[socket.socket], within_s: float, trickle: bool = False) -> float:
    started = time.monotonic()
    open_ = list(socks)
    while open_:
        assert time.monotonic() - started < within_s, f"{len(open_)} of {len(socks)} connections still open"
        if trickle:
            for s in open_:
                try:
                    s.sendall(b"X")  # one more byte of a header that never ends
                except OSError:
                    pass
        open_ = [s for s in open_ if not closed_by_peer(s)]
        time.sleep(0.3)
    return time.monotonic() - started


def test_silent_and_slowloris_connections_are_closed_within_seconds(system):
    silent = open_connections(system.port, 200)
    slow = open_connections(system.port, 100)
    for s in slow:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        assert wait_all_closed(silent, HEADER_TIMEOUT_S + 3) >= HEADER_TIMEOUT_S - 0.5
        assert wait_all_closed(slow, HEADER_TIMEOUT_S + 3, trickle=True) < HEADER_TIMEOUT_S + 3
    finally:
        for s in silent + slow:
            s.close()
    # the router still serves
    assert post(system, "/v1/completions", {"model": MOCK_MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_1_mib_header_is_a_431(system):
    r = httpx.post(f"{system.base_url}/v1/completions", headers={"X-Big": "a" * (1 << 20)}, timeout=10,
                   json={"model": MOCK_MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 431 and "larger than the limit" in r.json()["error"]["message"]
