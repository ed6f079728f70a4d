"""Serve instead of refusing, and learn a dead path once (issue 13, on one host; tests/multihost does the same
across network namespaces):

- no prefill worker alive: decode workers serve whole requests (200, /health says how it is degraded);
- a prefill worker that advertises an address nobody can connect to (bound on 127.0.0.2, advertising
  127.0.0.3): the first request pays the connect deadline (not the pull's), is recomputed on decode and answered
  right; the decode worker marks the pair (its heartbeat, /health, `pdserve status`), and later requests do not
  pay for the dead path again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from pdserve import nats_server
from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import Service, free_port, get_json

pytestmark = pytest.mark.e2e

CONNECT_TIMEOUT_S = 3.0
PROMPT = "the path that does not work " * 20


def complete(port: int, prompt: str = PROMPT) -> tuple[str, float]:
    started = time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": MOCK_MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], time.monotonic() - started


def wait_for_roles(port: int, roles: set[str], router: Service, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        _, health = get_json(f"http://127.0.0.1:{port}/health")
        if health and {w["role"] for w in health["workers"]} >= roles:
            return health
        assert time.monotonic() < deadline, router.output()[-3000:]
        time.sleep(0.2)


class System:
    """NATS and the services of one test, each started as its own command; all stopped by pid afterwards."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
        self.port = free_port()
        self.services: list[Service] = []

    def start(self, name: str, *argv: str) -> Service:
        service = Service([*argv, "--nats", self.nats.url], str(self.tmp_path / f"{name}.log"))
        self.services.append(service)
        return service

    def stop(self) -> None:
        try:
            for s in self.services:
                s.stop()
        finally:
            self.nats.stop()


def test_with_no_prefill_worker_decode_serves_whole_requests(tmp_path):
    system = System(tmp_path)
    try:
        router = system.start("router", "router", "--port", str(system.port))
        system.start("decode", "decode-worker", "--engine", "mock")
        wait_for_roles(system.port, {"decode"}, router)
        status, health = get_json(f"http://127.0.0.1:{system.port}/health")
        assert status == 200 and health["serving"] and any("no live prefill worker" in p for p in health["problems"])
        texts = {complete(system.port)[0] for _ in range(3)}
        assert len(texts) == 1 and texts != {""}
        assert router.output().count("route no_prefill_worker") == 3
        assert "no live prefill worker: decode workers serve whole requests" in router.output()
    finally:
        system.stop()


def test_a_prefill_worker_nobody_can_connect_to_costs_one_connect_deadline_then_is_routed_around(tmp_path):
    system = System(tmp_path)
    try:
        router = system.start("router", "router", "--port", str(system.port))
        # Reachable workers give the reference answer first (then they go: only the bad prefill worker is left).
        prefill = system.start("prefill", "prefill-worker", "--engine", "mock", "--bind-host", "127.0.0.2",
                               "--advertise-host", "127.0.0.3")
        decode = system.start("decode", "decode-worker", "--engine", "mock",
                              "--kv-connect-timeout-s", str(CONNECT_TIMEOUT_S), "--kv-probe-interval-s", "0.5")
        health = wait_for_roles(system.port, {"prefill", "decode"}, router)
        (prefill_row,) = [w for w in health["workers"] if w["role"] == "prefill"]
        assert prefill_row["transfer_address"].startswith("tcp://127.0.0.3:")

        first, first_s = complete(system.port)
        assert CONNECT_TIMEOUT_S * 0.9 < first_s < CONNECT_TIMEOUT_S + 5  # the connect deadline, not the pull's 10 s
        assert "PeerUnreachable" in decode.output() and "is unreachable from here" in decode.output()
        later = [complete(system.port) for _ in range(4)]
        assert all(text == first for text, _ in later)
        assert max(s for _, s in later) < CONNECT_TIMEOUT_S - 1, later  # nobody waits for that connect again
        print(f"first request {first_s:.2f} s (connect deadline {CONNECT_TIMEOUT_S} s); later ones "
              f"{', '.join(f'{s:.3f}' for _, s in later)} s")
        assert router.output().count("route prefill_unreachable") == 4
        assert decode.output().count("failed (PeerUnreachable") == 1  # one pull tried, by the first request

        _, health = get_json(f"http://127.0.0.1:{system.port}/health")
        (decode_row,) = [w for w in health["workers"] if w["role"] == "decode"]
        assert decode_row["unreachable_peer_ids"] == [prefill_row["worker_id"]]
        assert any("cannot reach the KV endpoints" in p for p in health["problems"])
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--nats", system.nats.url],
                              capture_output=True, text=True, timeout=30)
        assert f"{decode_row['worker_id']} cannot reach {prefill_row['worker_id']}" in done.stdout, done.stdout
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--json", "--nats", system.nats.url],
                              capture_output=True, text=True, timeout=30)
        rows = {r["worker_id"]: r for r in json.loads(done.stdout)}
        assert rows[decode_row["worker_id"]]["unreachable_peer_ids"] == [prefill_row["worker_id"]]
        assert prefill.process.poll() is None
    finally:
        system.stop()
