"""A NATS cluster with one node per host (issue 13, item 2): every service is given all three URLs; the node the
router is connected to is killed -9 while streams run on workers of other hosts: the router reconnects to
another node and every stream ends with its whole, exact answer (finished or resumed), and the next requests
are served. (tests/integration/test_nats_cluster.py does the same on one host, and for a decode worker's node.)"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
import urllib.request

import pytest

from tests.multihost.conftest import System, expected
from tests.multihost.hosts import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

MONITOR_PORT = 8222
PROMPTS = [f"cluster stream {i}: " + "which node carries this? " * 10 for i in range(6)]
MAX_TOKENS = 60


def client_names(ip: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://{ip}:{MONITOR_PORT}/connz?limit=4096", timeout=2) as r:
            return [c.get("name", "") for c in json.loads(r.read()).get("connections") or []]
    except OSError:
        return []


def route_names(ip: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"http://{ip}:{MONITOR_PORT}/routez", timeout=2) as r:
            return {route.get("remote_name", "") for route in json.loads(r.read()).get("routes") or []}
    except OSError:
        return set()


def test_the_routers_nats_node_killed_on_its_host_while_streams_run_every_stream_ends_whole(network):
    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    nodes = {h: h.start_nats(routes=[o for o in (a, b, c) if o is not h], args=["-m", str(MONITOR_PORT)])
             for h in (a, b, c)}
    urls = ",".join(node.url for node in nodes.values())
    wait_until(lambda: all(len(route_names(h.ip)) == 2 for h in nodes), 20,  # (nats pools routes: 3 per peer)
               lambda: f"the cluster to form: {[route_names(h.ip) for h in nodes]}")
    system = System(a, nats=urls)
    system.add_worker("prefill", b)
    for host in (c, d):
        system.add_worker("decode", host, "--mock-ms-per-decode-step", "30")
    system.wait_ready(1, 2)
    router_id = system.router.wait_for(r"router (\S+): OpenAI API").group(1)
    (routers_host,) = [h for h in nodes if router_id in client_names(h.ip)]

    streamed: dict[int, str] = {}
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(system.stream, p, MAX_TOKENS, 60, lambda text, i=i: streamed.__setitem__(i, text))
                   for i, p in enumerate(PROMPTS)]
        wait_until(lambda: len(streamed) == len(PROMPTS) and all(len(t) >= 5 for t in streamed.values()), 20,
                   lambda: f"streams under way: {streamed}")
        nodes[routers_host].signal(signal.SIGKILL)
        results = [f.result(timeout=90) for f in futures]
    for prompt, (text, finish, _) in zip(PROMPTS, results):
        assert (text, finish) == (expected(prompt, MAX_TOKENS), "length")
    wait_until(lambda: any(router_id in client_names(h.ip) for h in nodes if h is not routers_host), 10,
               "the router on another node")
    assert re.search(r"reconnected to NATS at", system.router.output()), system.router.output()[-3000:]
    started = time.monotonic()
    for i in range(3):
        response = system.complete(f"after the node died {i} " * 10, max_tokens=8)
        assert response.status_code == 200, response.text
    print(f"\nrouter's node on {routers_host.name} killed; 6 streams whole; 3 requests after it in "
          f"{time.monotonic() - started:.2f} s")
