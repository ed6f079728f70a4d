"""Multi-host fixtures: a `Network` per test (skipped, with the reason, where it cannot be built), and `System`,
pdserve spread over its hosts with each service started as a user starts it on its own machine
(`pdserve <service> --nats URL ...`, no address flags unless a test is about them)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from typing import Sequence

import httpx
import pytest

from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.protocol import SamplingParams
from pdserve.tokenizer import ByteTokenizer
from tests.multihost.hosts import Host, HostProcess, Network, leftovers, missing_requirements, wait_until

requires_nft = pytest.mark.skipif(shutil.which("nft") is None,
                                  reason="needs nftables' `nft` (Debian package nftables; .ci/run installs it)")


def pytest_configure(config):
    config.addinivalue_line("markers", "multihost: hosts in network namespaces on a bridge (root, iproute2)")


@pytest.fixture
def network(tmp_path):
    """A Network for one test, logs in tmp_path; after the test nothing of it is left (checked)."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with Network(tmp_path) as net:
        yield net
    assert not leftovers(net.tag), leftovers(net.tag)


def expected(prompt: str, max_tokens: int) -> str:
    """What the mock engine answers (temperature 0)."""
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


def get_json(url: str, timeout_s: float = 2) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"null")
    except (OSError, ValueError):
        return None


class System:
    """pdserve over a network's hosts: NATS and the KV broker on `head` (and the router, unless router=False);
    workers wherever add_worker puts them. The test process reaches the router at base_url over the switch
    (so the router listens on all interfaces: --host 0.0.0.0, as a router serving other machines does)."""

    def __init__(self, head: Host, *, nats: str | None = None, router: bool = True, router_args: Sequence[str] = (),
                 router_port: int = 8000):
        """nats: the URL(s) of NATS servers the test started itself (a cluster); else one starts on head."""
        self.head = head
        self.nats = None if nats else head.start_nats()
        self.nats_url = nats or self.nats.url
        self.broker = head.start_service("kv-broker", nats=self.nats_url)
        self.workers: list[HostProcess] = []
        self.router: HostProcess | None = None
        self.base_url = ""
        if router:
            self.start_router(head, args=router_args, port=router_port)

    def start_router(self, host: Host, *, nats: str | None = None, args: Sequence[str] = (),
                     port: int = 8000) -> HostProcess:
        self.router = host.start_service("router", "--host", "0.0.0.0", "--port", str(port), *args,
                                         nats=nats or self.nats_url)
        self.base_url = f"http://{host.ip}:{port}"
        return self.router

    def add_worker(self, role: str, host: Host, *args: str, nats: str | None = None,
                   name: str | None = None) -> HostProcess:
        """`pdserve <role>-worker --nats URL --engine mock <args>` on host."""
        worker = host.start_service(f"{role}-worker", "--engine", "mock", *args, nats=nats or self.nats_url,
                                    name=name or role)
        self.workers.append(worker)
        return worker

    def health(self) -> dict | None:
        return get_json(f"{self.base_url}/health")

    def wait_ready(self, num_prefill: int, num_decode: int, timeout_s: float = 40) -> dict:
        """The router's /health once it serves and lists that many live workers of each role (at least)."""
        def ready() -> dict | None:
            assert self.router is not None, "no router: start_router() first"
            for p in [self.router, self.broker, *([self.nats] if self.nats else []), *self.workers]:
                assert p.running(), f"{p} exited:\n{p.output()[-3000:]}"
            health = self.health()
            if not health or not health.get("serving"):
                return None
            roles = [w["role"] for w in health["workers"]]
            return health if roles.count("prefill") >= num_prefill and roles.count("decode") >= num_decode else None

        return wait_until(ready, timeout_s, lambda: f"{num_prefill}P{num_decode}D ready; /health: {self.health()}\n"
                          + "\n".join(f"--- {p}\n{p.output()[-1500:]}" for p in [self.router, *self.workers] if p))

    def worker_on(self, host: Host, role: str) -> dict:
        """The /health row of the one `role` worker whose transfer address is on host."""
        rows = [w for w in (self.health() or {}).get("workers", [])
                if w["role"] == role and w["transfer_address"].startswith(f"tcp://{host.ip}:")]
        assert len(rows) == 1, (host, role, self.health())
        return rows[0]

    @staticmethod
    def kv_ports(worker: HostProcess, timeout_s: float = 30) -> list[int]:
        """The ports of the worker's KV transfer endpoint: ZeroMQ (the one in transfer_address), then byte stream
        (taken from its log line; both bound at random: a firewall or a proxy needs both)."""
        found = worker.wait_for(r"kv transfer endpoint serving on tcp://\S+:(\d+) .*tcp stream port (\d+)", timeout_s)
        return [int(port) for port in found.groups()]

    def complete(self, prompt: str, max_tokens: int, timeout_s: float = 30) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/completions", timeout=timeout_s, json={
            "model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

    def stream(self, prompt: str, max_tokens: int, timeout_s: float = 40,
               on_chunk=None) -> tuple[str, str | None, float]:
        """A streamed completion: (text, finish_reason, seconds); every event's text in order, the error event's
        message as an AssertionError. on_chunk(text so far) after each chunk."""
        started = time.monotonic()
        text, finish = [], None
        with httpx.stream("POST", f"{self.base_url}/v1/completions", timeout=timeout_s, json={
                "model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                choice = event["choices"][0]
                text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
                if on_chunk is not None:
                    on_chunk("".join(text))
                assert time.monotonic() - started < timeout_s, f"stream past {timeout_s}s"
        return "".join(text), finish, time.monotonic() - started
