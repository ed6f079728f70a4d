"""`pdserve up` watches its children: nats-server or the KV broker killed -9 under load is restarted (and says
so), every request ends well within 15 s, new requests get a fast 503 while NATS is away; a child that keeps
dying ends `pdserve up` with a non-zero status naming it and its last log lines; /health says "degraded", with
why, when the KV broker is missing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest

from pdserve import nats_server
from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, Service, descendants, free_port, get_json

pytestmark = pytest.mark.e2e

REQUEST_LIMIT_S = 15.0


def child_pid(up: PdserveUp, marker: bytes) -> int:
    """The pid of the child of `up` whose command line has `marker` (one of ours: by pid, never by name)."""
    for pid in sorted(descendants(up.process.pid)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    return pid
        except OSError:
            pass
    raise AssertionError(f"no child with {marker!r} in its command line")


class Load:
    """Clients that send streaming requests back to back; each request's outcome and duration is kept."""

    def __init__(self, base_url: str, num_clients: int = 6):
        self.base_url, self.num_clients = base_url, num_clients
        self.outcomes: list[tuple[int | str, float]] = []  # (status or error, seconds)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_LIMIT_S + 30) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.num_clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                async with http.stream("POST", f"{self.base_url}/v1/completions", json={
                        "model": MOCK_MODEL, "prompt": f"client {i} request {n}", "max_tokens": 30,
                        "stream": True}) as r:
                    outcome: int | str = r.status_code
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"error"' in line:
                            outcome = "stream error"
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            self.outcomes.append((outcome, time.monotonic() - started))
            if outcome != 200:
                await asyncio.sleep(0.2)


async def kill_under_load(up: PdserveUp, marker: bytes, restarted_line: str) -> Load:
    load = Load(up.base_url)
    running = asyncio.create_task(load.run())
    await asyncio.sleep(1.5)
    os.kill(child_pid(up, marker), signal.SIGKILL)
    killed_at = time.monotonic()
    while restarted_line not in up.output():
        assert time.monotonic() - killed_at < 15, up.output()[-3000:]
        await asyncio.sleep(0.1)
    await asyncio.sleep(4)  # serving again after the restart
    load.stop()
    await asyncio.wait_for(running, REQUEST_LIMIT_S + 30)
    return load


@pytest.fixture
def system(tmp_path):
    with PdserveUp(tmp_path, free_port(), "--prefill", "2", "--decode", "2").running(2, 2) as up:
        yield up


async def test_nats_server_killed_under_load_is_restarted_and_every_request_ends(system):
    load = await kill_under_load(system, b"nats-server", "nats-server restarted")
    out = system.output()
    assert "nats-server (pid" in out and "killed by SIGKILL; restarting it" in out
    assert load.outcomes and max(seconds for _, seconds in load.outcomes) < REQUEST_LIMIT_S, load.outcomes
    # while NATS was away, new requests were answered at once (503), not left to hang
    refused = [seconds for outcome, seconds in load.outcomes if outcome == 503]
    assert all(seconds < 1.0 for seconds in refused), refused
    recent = [outcome for outcome, _ in load.outcomes[-6:]]
    assert recent == [200] * 6, f"not serving again after the restart: {load.outcomes[-12:]}"
    status, health = get_json(f"{system.base_url}/health")
    assert status == 200 and health["status"] == "ok", health


async def test_kv_broker_killed_under_load_is_restarted_and_every_request_ends(system):
    load = await kill_under_load(system, b"kv-broker", "kv-broker restarted")
    assert max(seconds for _, seconds in load.outcomes) < REQUEST_LIMIT_S
    assert all(outcome == 200 for outcome, _ in load.outcomes), load.outcomes  # routing went on by load alone
    deadline = time.monotonic() + 10
    while True:
        status, health = get_json(f"{system.base_url}/health")
        if status == 200 and health["status"] == "ok" and len(health["kv_brokers"]) == 1:
            break
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.2)


def test_a_child_that_keeps_dying_ends_pdserve_up_naming_it(tmp_path):
    up = PdserveUp(tmp_path, free_port())
    up.wait_ready(1, 1)
    try:
        for death in range(1, 6):
            deadline = time.monotonic() + 30
            while len(re.findall(r"KV broker \S+ ready", up.output())) < death:  # this life's broker is up
                assert time.monotonic() < deadline, up.output()[-3000:]
                time.sleep(0.1)
            os.kill(child_pid(up, b"kv-broker"), signal.SIGKILL)
        assert up.process.wait(timeout=30) == 1
    finally:
        up.stop()
        assert not up.kill_leftovers()
    out = up.output()
    assert "kv-broker died 5 times within 120s; stopping everything. Its last log lines:" in out
    assert "KV broker" in out.split("Its last log lines:")[-1]  # its own lines, e.g. "KV broker ... ready"


def test_health_says_degraded_with_why_when_the_kv_broker_is_missing(tmp_path):
    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    port = free_port()
    services = [Service(["router", "--nats", nats.url, "--port", str(port)], str(tmp_path / "router.log")),
                Service(["prefill-worker", "--nats", nats.url], str(tmp_path / "prefill.log")),
                Service(["decode-worker", "--nats", nats.url], str(tmp_path / "decode.log"))]
    try:
        deadline = time.monotonic() + 30
        while True:
            status, health = get_json(f"http://127.0.0.1:{port}/health")
            if health and {w["role"] for w in health["workers"]} == {"prefill", "decode"}:
                break
            assert time.monotonic() < deadline, services[0].output()
            time.sleep(0.2)
        assert status == 200 and health["status"] == "degraded" and health["serving"], health
        assert any("no live KV broker" in p and "by load alone" in p for p in health["problems"]), health
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MOCK_MODEL, "prompt": "hi"},
                       timeout=10)
        assert r.status_code == 200
    finally:
        for s in services:
            s.stop()
        nats.stop()
