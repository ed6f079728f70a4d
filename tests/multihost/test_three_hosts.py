"""pdserve over several hosts (network namespaces on a switch, tests/multihost/hosts.py), each service started
as a user starts it on its own machine:

- router, KV broker and NATS on a, a prefill worker on b, a decode worker on c: answers are right, the prefill
  worker advertises b's address (found by itself) and the decode worker pulls the KV from it over TCP;
- a slow link (50 ms each way, delay_proxy.py) in the KV path and in the router's NATS connection: answers
  are still right, within tight router deadlines, and a request that outlasts its deadline still ends by it;
- the cable of the decode host pulled while four streams decode there: every client gets its whole answer
  (the router resumes each stream on the decode worker of another host); plugged back in, the host's worker
  is listed again.
"""

from __future__ import annotations

import concurrent.futures
import re
import time

import pytest

from tests.multihost.conftest import System, expected
from tests.multihost.hosts import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

PROMPTS = [f"host question {i}: " + "which machine holds the KV? " * 15 for i in range(4)]
DELAY_MS = 50


def pulls(decode_log: str) -> list[tuple[str, str, float]]:
    """(prefill worker id, transport, ms) of each "pulled N KV blocks ... from W over T in X ms" line."""
    return [(m.group(1), m.group(2), float(m.group(3))) for m in
            re.finditer(r"pulled \d+ KV blocks \(\d+ bytes\) from (\S+) over (\S+) in ([\d.]+) ms", decode_log)]


def test_router_prefill_and_decode_on_three_hosts_pull_kv_over_tcp_from_the_advertised_address(network):
    a, b, c = network.add_hosts("a", "b", "c")
    system = System(a)
    system.add_worker("prefill", b)
    decode = system.add_worker("decode", c)
    system.wait_ready(1, 1)
    prefill_row, decode_row = system.worker_on(b, "prefill"), system.worker_on(c, "decode")
    # Each found its own address (the interface that reaches NATS) and has its host's name in its id.
    assert prefill_row["worker_id"].startswith("prefill-b-") and decode_row["worker_id"].startswith("decode-c-")

    for prompt in PROMPTS:
        response = system.complete(prompt, max_tokens=8)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected(prompt, 8)
    done = wait_until(lambda: len(pulls(decode.output())) >= len(PROMPTS) and pulls(decode.output()), 10,
                      lambda: decode.output()[-3000:])
    assert [(worker, transport) for worker, transport, _ in done] == [(prefill_row["worker_id"], "tcp")] * len(PROMPTS)


def test_a_slow_link_in_the_kv_path_and_the_routers_nats_keeps_answers_right_and_deadlines(network):
    a, b, c, slow = network.add_hosts("a", "b", "c", "slow")
    system = System(a, router=False)
    # The prefill worker on b tells others to reach it at the slow host, which forwards to b 50 ms later each way.
    # Its endpoint's two ports (ZeroMQ and byte stream) are only known once it listens: the proxy takes the same
    # numbers on the slow host, where every port is free.
    prefill = system.add_worker("prefill", b, "--advertise-host", slow.ip, "--bind-host", b.ip)
    slow.start_delay_proxy(DELAY_MS, {port: (b.ip, port) for port in system.kv_ports(prefill)}, name="kv-proxy")
    slow.start_delay_proxy(DELAY_MS, {4222: (a.ip, 4222)}, name="nats-proxy")
    deadlines = ["--request-timeout-s", "3", "--prefill-timeout-s", "2", "--decode-accept-timeout-s", "1",
                 "--stream-idle-timeout-s", "1.5"]
    system.start_router(a, nats=f"nats://{slow.ip}:4222", args=deadlines)
    decode = system.add_worker("decode", c, "--mock-ms-per-decode-step", "5")
    system.wait_ready(1, 1)
    assert system.worker_on(slow, "prefill")["worker_id"].startswith("prefill-b-")

    for prompt in PROMPTS:
        started = time.monotonic()
        response = system.complete(prompt, max_tokens=8)
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected(prompt, 8)
        # At least 4 crossings of the router's slow NATS link (prefill asked and answered, decode asked, tokens).
        assert 4 * DELAY_MS / 1000 <= took < 3, took
    done = wait_until(lambda: len(pulls(decode.output())) >= len(PROMPTS) and pulls(decode.output()), 10,
                      lambda: decode.output()[-3000:])
    assert {transport for _, transport, _ in done} == {"tcp"}
    assert all(ms >= 2 * DELAY_MS for _, _, ms in done), done  # a pull is at least one round trip over the proxy

    # A request that outlasts its deadline (1,000 tokens at 5 ms) ends by it, slow link or not.
    started = time.monotonic()
    response = system.complete("a long answer, please", max_tokens=1000)
    took = time.monotonic() - started
    assert took < 3 + 1.5, took
    assert response.status_code == 504, response.text
    assert "ran out of time during decode" in response.text  # the request's deadline, not blamed on the worker


def test_decode_hosts_cable_pulled_mid_stream_every_client_gets_its_whole_answer(network):
    a, b, c, d = network.add_hosts("a", "b", "c", "d")
    system = System(a)
    system.add_worker("prefill", b)
    slow_decode = ["--mock-ms-per-decode-step", "30"]  # 300 tokens: a stream of ~9 s
    system.add_worker("decode", c, *slow_decode)
    system.wait_ready(1, 1)
    prompts = [f"stream {i} that outlives its decode host" for i in range(4)]
    first_chunks = [False] * len(prompts)

    def client(i: int) -> tuple[str, str | None, float]:
        return system.stream(prompts[i], 300, timeout_s=40,
                             on_chunk=lambda text: first_chunks.__setitem__(i, len(text) > 1))

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streams = [pool.submit(client, i) for i in range(len(prompts))]
        wait_until(lambda: all(first_chunks) or any(s.done() for s in streams), 20, "every stream decoding on c")
        # Another decode host joins; then c's cable comes out while all four decode there.
        system.add_worker("decode", d, *slow_decode)
        system.wait_ready(1, 2)
        assert not any(s.done() for s in streams), "streams ended before the cable came out: make them longer"
        c.link_down()
        pulled_at = time.monotonic()
        results = [s.result(timeout=45) for s in streams]
    for prompt, (text, finish, _) in zip(prompts, results):
        assert (text, finish) == (expected(prompt, 300), "length")
    resumed = re.findall(r"resuming on (decode-d-\S+) after \d+ tokens", system.router.output())
    assert len(resumed) == len(prompts), system.router.output()[-3000:]
    print(f"all {len(prompts)} streams whole, {time.monotonic() - pulled_at:.1f}s after the cable came out")

    c.link_up()  # c's worker comes back (its NATS connection recovers at TCP's next retransmission)
    plugged_at = time.monotonic()
    wait_until(lambda: any(w["worker_id"].startswith("decode-c-") for w in (system.health() or {}).get("workers", [])),
               30, lambda: f"c's decode worker not back: {system.health()}")
    print(f"c's decode worker listed again {time.monotonic() - plugged_at:.1f}s after the cable went back in")
