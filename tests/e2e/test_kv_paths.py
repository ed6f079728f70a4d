"""The path KV takes is chosen by where the peers are, with no flag:

- `pdserve up --engine mock` (every worker on this host): the shm path (visible in `pdserve status`, the decode
  worker's log line and its metrics); `--kv-transport tcp` and `--kv-transport nixl` (NIXL over UCX) still work;
  the answers are identical every way;
- a prefill worker in another network namespace (another host, as far as the kernel's namespaces go) is
  reached over TCP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import httpx
import pytest

from pdserve import nats_server
from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import PdserveUp, Service, free_port, get_json

pytestmark = pytest.mark.e2e

PROMPTS = [f"question {i}: " + "where does the KV go? " * 20 for i in range(4)]


def answers(base_url: str) -> list[str]:
    return [httpx.post(f"{base_url}/v1/completions", timeout=30, json={
        "model": MOCK_MODEL, "prompt": p, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
        for p in PROMPTS]


def status_rows(up: PdserveUp) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--json", "--nats", up.nats_url,
                           "--nats-credentials-file", up.credentials_file("observer"), "--listen-s", "1.5"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def decode_metrics(up: PdserveUp) -> str:
    _, health = get_json(f"{up.base_url}/health")
    (address,) = [w["metrics_address"] for w in health["workers"] if w["role"] == "decode"]
    with urllib.request.urlopen(address, timeout=5) as r:
        return r.read().decode()


def openai_answers(base_url: str) -> list[str]:
    """The same prompts through the official openai client, as chat completions."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=30, max_retries=0)
    return [client.chat.completions.create(model=MOCK_MODEL, messages=[{"role": "user", "content": p}],
                                           max_tokens=8, temperature=0).choices[0].message.content for p in PROMPTS]


def test_one_host_takes_shm_and_tcp_or_nixl_on_request_gives_the_same_answers(tmp_path):
    """nixl runs with UCX_TLS=tcp: UCX's TCP transport, what hosts without RDMA NICs use between them."""
    results, chats = {}, {}
    for transport in ("auto", "tcp", "nixl"):
        extra = [] if transport == "auto" else ["--kv-transport", transport]
        env = {"UCX_TLS": "tcp"} if transport == "nixl" else None
        with PdserveUp(tmp_path, free_port(), *extra, name=transport, env=env).running(1, 1) as up:
            results[transport] = answers(up.base_url)
            chats[transport] = openai_answers(up.base_url)
            time.sleep(1.2)  # a heartbeat carries the counts
            (decode,) = [r for r in status_rows(up) if r["role"] == "decode"]
            (prefill,) = [r for r in status_rows(up) if r["role"] == "prefill"]
            path = {"auto": "shm"}.get(transport, transport)
            assert decode["num_kv_pulls"].get(path) == 2 * len(PROMPTS), decode
            # nixl is offered only when asked for here: auto offers it where a host has an active RDMA port
            assert prefill["kv_transports"] == (["tcp", "shm", "nixl"] if transport == "nixl" else ["tcp", "shm"])
            assert re.search(rf'pdserve_kv_pulls_total{{[^}}]*transport="{path}"[^}}]*}} {2 * len(PROMPTS)}\.0',
                             decode_metrics(up)), decode_metrics(up)
            assert up.output().count(f"over {path} in") >= 2 * len(PROMPTS)
            assert "instead of" not in up.output()
    assert results["auto"] == results["tcp"] == results["nixl"] and all(results["auto"])
    assert chats["auto"] == chats["tcp"] == chats["nixl"] and all(chats["auto"])


needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="network namespaces need root and iproute2's `ip`")


@needs_netns
def test_a_prefill_worker_in_another_namespace_is_reached_over_tcp(tmp_path):
    ns, host_if, ns_if = f"pdk{os.getpid() % 100000}", f"pdk{os.getpid() % 100000}h", f"pdk{os.getpid() % 100000}n"
    host_ip, ns_ip = "198.18.7.1", "198.18.7.2"

    def ip(*args: str, netns: str | None = None) -> None:
        cmd = ["ip", *(["-n", netns] if netns else []), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    ip("netns", "add", ns)
    services: list[Service] = []
    nats = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{ns_ip}/24", "dev", ns_if, netns=ns)
        ip("link", "set", ns_if, "up", netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
        nats = nats_server.start(host=host_ip, store_dir=str(tmp_path / "nats"), die_with_parent=True)
        port = free_port()
        common = ["--nats", nats.url]
        services.append(Service(["router", *common, "--port", str(port)], str(tmp_path / "router.log")))
        services.append(Service(["decode-worker", *common], str(tmp_path / "decode.log")))
        # The prefill worker on the other "host": started inside the namespace, as a user would start it there.
        prefill = Service(["prefill-worker", *common], str(tmp_path / "prefill.log"),
                          wrapper=("ip", "netns", "exec", ns))
        services.append(prefill)
        deadline = time.monotonic() + 60
        while True:
            _, health = get_json(f"http://127.0.0.1:{port}/health")
            if health and {w["role"] for w in health["workers"]} == {"prefill", "decode"}:
                break
            assert time.monotonic() < deadline, prefill.output() + services[0].output()
            time.sleep(0.2)
        (prefill_row,) = [w for w in health["workers"] if w["role"] == "prefill"]
        assert prefill_row["transfer_address"].startswith(f"tcp://{ns_ip}:")
        texts = answers(f"http://127.0.0.1:{port}")
        assert all(texts)
        decode_log = services[1].output()
        assert decode_log.count("over tcp in") == len(PROMPTS), decode_log[-2000:]
        assert "over shm" not in decode_log and "instead of shm" not in decode_log
    finally:
        for s in services:
            s.stop()
        if nats is not None:
            nats.stop()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
