"""Paths that do not work across hosts are learned once, not paid for again (issue 13, item 3):

- a prefill worker that advertises an address nobody has (bound on all interfaces, as behind a NAT gone wrong):
  the first request pays the decode worker's connect deadline (not the pull's), is recomputed and answered
  right; the pair is marked (the decode worker's heartbeat, /health, `pdserve status`) and later requests are
  served by decode at once, each far under a second;
- a firewall on the prefill host that drops its transfer port: the same, and requests go to the prefill worker
  of another host; once the rule goes, a probe clears the mark and KV moves from that host again.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.multihost.conftest import System, expected, requires_nft
from tests.multihost.hosts import pdserve_command, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

CONNECT_TIMEOUT_S = 2.0
DECODE_ARGS = ("--kv-connect-timeout-s", str(CONNECT_TIMEOUT_S), "--kv-probe-interval-s", "0.5")


def timed(system: System, prompt: str) -> float:
    started = time.monotonic()
    response = system.complete(prompt, max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected(prompt, 8)
    return time.monotonic() - started


def marks(system: System) -> dict[str, list[str]]:
    return {w["worker_id"]: w["unreachable_peer_ids"] for w in (system.health() or {}).get("workers", [])
            if w.get("unreachable_peer_ids")}


def test_an_advertised_address_nobody_has_costs_one_connect_deadline_then_decode_serves_at_once(network):
    a, b, c = network.add_hosts("a", "b", "c")
    nobody = str(network.subnet.network_address + 250)  # on the switch's subnet, no host has it
    system = System(a)
    system.add_worker("prefill", b, "--bind-host", "0.0.0.0", "--advertise-host", nobody)
    decode = system.add_worker("decode", c, *DECODE_ARGS)
    system.wait_ready(1, 1)
    (prefill_id,) = [w["worker_id"] for w in system.health()["workers"] if w["role"] == "prefill"]

    first = timed(system, "the first one pays " * 20)
    assert CONNECT_TIMEOUT_S * 0.9 < first < CONNECT_TIMEOUT_S + 4, first  # not the pull's 10 s deadline
    later = [timed(system, f"later request {i} " * 20) for i in range(5)]
    print(f"\nfirst request {first:.2f} s (connect deadline {CONNECT_TIMEOUT_S:g} s); later: "
          + ", ".join(f"{s:.3f}" for s in later) + " s")
    assert max(later) < 1.0, later  # the target: under 1 s added once the path is known dead
    assert decode.output().count("failed (PeerUnreachable") == 1, decode.output()[-3000:]
    assert system.router.output().count("route prefill_unreachable") == len(later)
    assert list(marks(system).values()) == [[prefill_id]]
    status = a.run([*pdserve_command(), "status", "--nats", system.nats.url])
    assert re.search(rf"decode-c-\S+ cannot reach {prefill_id}", status.stdout), status.stdout


@requires_nft
def test_a_firewalled_transfer_port_is_routed_around_and_the_mark_clears_when_the_rule_goes(network):
    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    # round_robin takes prefill workers in the order of their ids: prefill-b-... first, then prefill-d-...
    system = System(a, router_args=("--routing", "round_robin"))
    system.add_worker("prefill", b)
    system.add_worker("prefill", d)
    decode = system.add_worker("decode", c, *DECODE_ARGS)
    system.wait_ready(2, 1)
    on_b = system.worker_on(b, "prefill")
    port = int(on_b["transfer_address"].rsplit(":", 1)[1])
    b.drop_port(port, "in")  # before any pull: no connection to b's endpoint exists yet

    took = [timed(system, f"firewalled {i} " * 20) for i in range(6)]
    print(f"\nwith b's transfer port dropped: {', '.join(f'{s:.3f}' for s in took)} s")
    assert CONNECT_TIMEOUT_S * 0.9 < took[0] < CONNECT_TIMEOUT_S + 4, took  # the first went to b
    assert max(took[1:]) < 1.0, took
    assert decode.output().count("failed (PeerUnreachable") == 1
    assert marks(system) == {system.worker_on(c, "decode")["worker_id"]: [on_b["worker_id"]]}
    routes = re.findall(r"route \w+: prefill (\S+)", system.router.output())
    assert on_b["worker_id"] not in routes[1:], routes  # after the mark nobody sends b's KV to c

    b.undrop()
    wait_until(lambda: not marks(system), 10, lambda: f"mark still there: {system.health()}")
    assert "is reachable again" in decode.output()
    for i in range(4):  # round robin comes back to b: its KV moves again
        timed(system, f"open again {i} " * 20)
    pulled_from = re.findall(r"pulled \d+ KV blocks \(\d+ bytes\) from (\S+) over tcp", decode.output())
    assert on_b["worker_id"] in pulled_from, decode.output()[-3000:]
    rows = json.loads(a.run([*pdserve_command(), "status", "--json", "--nats", system.nats.url]).stdout)
    assert all(not r["unreachable_peer_ids"] for r in rows)
