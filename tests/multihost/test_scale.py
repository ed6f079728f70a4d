"""Scale with membership churn (issue 13, item 6): 50 mock workers over five hosts while workers leave and join
every few seconds under a steady load of streamed requests.

NATS, the KV broker and the router on host a; 20 prefill workers on p1-p2 and 30 decode workers on d1-d3. On
each worker host one process hosts 9 workers (tests/multihost/many_workers.py: one interpreter instead of nine)
and one worker runs alone, as `pdserve <role>-worker`. Every CHURN_EVERY_S one worker leaves and a new one joins,
the roles in turn; per role, leaving alternates between a clean stop (a hosted worker stopped: its goodbye) and
kill -9 (the lone worker's process: the router must notice the missed heartbeats), and the new worker joins the
same way (a hosted worker started, or a new lone process). Meanwhile NUM_CLIENTS clients stream completions in
a closed loop, their prompts sharing a few long prefixes so that the broker's lookup has blocks to find.

Asserted: every request ends with HTTP 200 and the mock engine's whole answer (a stream resumed on another worker
counts, its text must still be exact), no call hangs (a deadline on each), and the router's /health follows the
churn (a worker that left is gone from it, one that joined is in it, and at the end it lists exactly the workers
alive). Printed (run with -s): workers, requests, churn events, the router's routing decision time and the
broker's lookup time p50/p99 (from the router's per-request log line), RSS and start-up CPU per process.
Timings are figures to report, not assertions.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from pdserve.config import MOCK_MODEL
from tests.multihost.conftest import System, expected, get_json
from tests.multihost.hosts import Host, HostProcess, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

PREFILL_HOSTS, DECODE_HOSTS = ("p1", "p2"), ("d1", "d2", "d3")
WORKERS_PER_HOST = 10  # one of them alone in its process (the one kill -9 takes), the others hosted together
NUM_CLIENTS = 8
LOAD_S = 45
CHURN_EVERY_S = 2.5
MAX_TOKENS = 40
REQUEST_TIMEOUT_S = 30  # no request may take longer, stalled or not
# Small mock workers: 64 KV blocks of a 4-layer KV (6 MB of pool each), fast simulated prefill and decode
# (40 tokens: ~0.2 s of decode, long enough that churn catches streams mid-way).
WORKER_ARGS = ("--num-kv-blocks", "64", "--max-model-len", "2048", "--mock-num-layers", "4",
               "--mock-ms-per-prompt-token", "0.01", "--mock-ms-per-decode-step", "5")
# Gone from /health after a goodbye / after kill -9 (3 missed 1 s heartbeats, pruned every 0.5 s), joined after
# its start was asked for: bounds of correctness (a router that never notices fails them), far above the figures.
GONE_AFTER_GOODBYE_S, GONE_AFTER_KILL_S, JOINED_WITHIN_S = 5.0, 10.0, 20.0
SYSTEM_PROMPTS = [f"system prompt {g}: you answer questions about host {g} and its KV blocks. " * 4
                  for g in range(6)]  # 280 bytes each: with the "question" after it, 9 blocks of 32 tokens per group
ROUTE_LINE = re.compile(r"request (\S+): route (\S+): .*; kv lookup (\w+) ([\d.]+) ms, decided in ([\d.]+) ms")


# ---- the workers

@dataclass
class HostedGroup:
    """A many_workers process: its workers stop (oldest first) and start on signals, one log line each."""

    process: HostProcess
    role: str
    id_prefix: str
    running: list[str]  # worker ids, oldest first
    num_started: int

    def stop_oldest(self) -> str:
        worker_id = self.running.pop(0)
        self.process.signal(signal.SIGUSR1)
        return worker_id

    def start_one(self) -> str:
        worker_id = f"{self.id_prefix}-{self.num_started}"
        self.num_started += 1
        self.running.append(worker_id)
        self.process.signal(signal.SIGUSR2)
        return worker_id

    def wait_logged(self, worker_id: str, what: str, timeout_s: float = 20) -> None:
        self.process.wait_for(rf"worker {re.escape(worker_id)} {what} \(", timeout_s=timeout_s)


def start_hosted(host: Host, role: str, count: int, nats: str) -> HostedGroup:
    prefix = f"{role}-{host.name}-h"
    process = host.start(f"{role}-hosted", [sys.executable, "-m", "tests.multihost.many_workers", "--role", role,
                                            "--count", str(count), "--id-prefix", prefix, "--nats", nats,
                                            "--engine", "mock", *WORKER_ARGS])
    return HostedGroup(process, role, prefix, [f"{prefix}-{n}" for n in range(count)], count)


def start_alone(system: System, host: Host, role: str, n: int) -> tuple[HostProcess, str]:
    worker_id = f"{role}-{host.name}-k{n}"
    return system.add_worker(role, host, "--worker-id", worker_id, *WORKER_ARGS, name=f"{role}-k{n}"), worker_id


def process_figures(process: HostProcess) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds used so far) of a harness process and what it started in its group."""
    rss_kib, ticks = 0, 0
    for pid in [process.pid, *_children(process.pid)]:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                rss_kib += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
    return rss_kib / 1024, ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    return []


# ---- the load

@dataclass
class Outcome:
    request_id: str
    ok: bool
    seconds: float
    error: str = ""


def stream_once(client: httpx.Client, base_url: str, prompt: str) -> Outcome:
    """One streamed completion, checked: HTTP 200, no error event, the mock's exact text, finish_reason length."""
    started = time.monotonic()
    request_id, text, finish = "?", [], None
    try:
        with client.stream("POST", f"{base_url}/v1/completions", json={
                "model": MOCK_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True}) as r:
            request_id = r.headers.get("x-request-id", "?")
            if r.status_code != 200:
                return Outcome(request_id, False, time.monotonic() - started, f"HTTP {r.status_code}: {r.read()!r}")
            for line in r.iter_lines():
                if time.monotonic() - started > REQUEST_TIMEOUT_S:
                    return Outcome(request_id, False, time.monotonic() - started, "past the deadline")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Outcome(request_id, False, time.monotonic() - started, f"error event {event}")
                choice = event["choices"][0]
                text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as e:
        return Outcome(request_id, False, time.monotonic() - started, f"{type(e).__name__}: {e}")
    want = expected(prompt, MAX_TOKENS)
    got = "".join(text)
    if (got, finish) != (want, "length"):
        return Outcome(request_id, False, time.monotonic() - started,
                       f"answer {got!r} ({finish}), expected {want!r} (length)")
    return Outcome(request_id, True, time.monotonic() - started)


def run_client(base_url: str, number: int, stop: threading.Event, outcomes: list[Outcome]) -> None:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)
    with httpx.Client(timeout=timeout) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            # The shared prefix, then two blocks of its own: never held whole by a decode worker's cache, so each
            # request goes through a prefill worker (and a KV pull), which reuses its cached part of the prefix.
            prompt = (f"{SYSTEM_PROMPTS[(number + n) % len(SYSTEM_PROMPTS)]}question {n} from client {number}: "
                      + "why? " * 10)
            outcomes.append(stream_once(client, base_url, prompt))


@dataclass
class HealthWatch:
    """Polls the router's /health: when each worker id was first and last listed (monotonic)."""

    base_url: str
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    num_polls: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.25):
            health = get_json(f"{self.base_url}/health", timeout_s=2)
            now = time.monotonic()
            if not health:
                continue
            self.num_polls += 1
            for row in health.get("workers", []):
                self.first_seen.setdefault(row["worker_id"], now)
                self.last_seen[row["worker_id"]] = now


@dataclass
class Churn:
    at: float  # monotonic, when the worker was told to leave (or killed)
    kind: str  # "goodbye" or "kill"
    role: str
    left: str
    joined: str
    joined_asked_at: float = 0.0


def mentions(network, request_id: str, limit: int = 3000) -> str:
    """Every log line of every process that names request_id (why a request failed), prefixed by the process."""
    lines = [f"  {p.host.name}/{p.name}: {line}" for p in network.processes() for line in p.output().splitlines()
             if request_id in line]
    return "\n".join(lines)[-limit:]


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99), nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.50 * len(ordered)) - 1)], ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# ---- the test

def test_fifty_workers_with_churn_every_request_is_answered_and_routing_time_is_measured(network):
    began = time.monotonic()
    head = network.add_host("a")
    prefill_hosts = network.add_hosts(*PREFILL_HOSTS)
    decode_hosts = network.add_hosts(*DECODE_HOSTS)
    system = System(head)
    url = system.nats.url
    groups: dict[str, list[HostedGroup]] = {"prefill": [], "decode": []}
    alone: dict[str, list[tuple[Host, HostProcess, str]]] = {"prefill": [], "decode": []}
    numbers = itertools.count()
    for role, hosts in (("prefill", prefill_hosts), ("decode", decode_hosts)):
        for host in hosts:
            groups[role].append(start_hosted(host, role, WORKERS_PER_HOST - 1, url))
            alone[role].append((host, *start_alone(system, host, role, next(numbers))))
    num_prefill, num_decode = WORKERS_PER_HOST * len(PREFILL_HOSTS), WORKERS_PER_HOST * len(DECODE_HOSTS)
    for group in groups["prefill"] + groups["decode"]:
        group.process.wait_for(r"all \d+ \w+ workers started", timeout_s=60)
    system.wait_ready(num_prefill, num_decode, timeout_s=60)
    started_in = time.monotonic() - began
    figures = {p.name + "@" + p.host.name: process_figures(p) for p in
               [g.process for gs in groups.values() for g in gs] + [p for a in alone.values() for _, p, _ in a]}

    def live_ids() -> set[str]:
        return {w for gs in groups.values() for g in gs for w in g.running} | \
               {w for a in alone.values() for _, _, w in a}

    watch = HealthWatch(system.base_url)
    stop_load = threading.Event()
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=watch.run, daemon=True)] + [
        threading.Thread(target=run_client, args=(system.base_url, c, stop_load, outcomes), daemon=True)
        for c in range(NUM_CLIENTS)]
    for t in threads:
        t.start()

    # Churn while the load runs: the roles in turn, per role goodbye and kill -9 in turn.
    churns: list[Churn] = []
    turns = {"prefill": itertools.count(), "decode": itertools.count()}
    load_started = time.monotonic()
    next_at = load_started + CHURN_EVERY_S
    for k in itertools.count():
        if next_at > load_started + LOAD_S - 2 * CHURN_EVERY_S:
            break  # the last changes settle while the load still runs
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += CHURN_EVERY_S
        role = ("prefill", "decode")[k % 2]
        turn = next(turns[role])
        if turn % 2 == 0:  # a hosted worker says goodbye, another hosted one joins
            group = groups[role][(turn // 2) % len(groups[role])]
            at = time.monotonic()
            left = group.stop_oldest()
            joined = group.start_one()
            churn = Churn(at, "goodbye", role, left, joined, time.monotonic())
            group.wait_logged(left, "stopped")
            group.wait_logged(joined, "started")
        else:  # a lone worker is killed -9, a new lone one starts on its host
            i = (turn // 2) % len(alone[role])
            host, process, left = alone[role][i]
            at = time.monotonic()
            process.signal(signal.SIGKILL)
            process.finish(time.monotonic() + 5)
            new_process, joined = start_alone(system, host, role, next(numbers))
            alone[role][i] = (host, new_process, joined)
            churn = Churn(at, "kill", role, left, joined, time.monotonic())
            new_process.wait_for(r"worker \S+: model", timeout_s=30)
        churns.append(churn)
    time.sleep(max(0.0, load_started + LOAD_S - time.monotonic()))
    stop_load.set()
    for t in threads[1:]:
        t.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads[1:]), "a client hangs past its request deadline"
    load_s = time.monotonic() - load_started

    # Membership: the router's view ends as exactly the workers alive, and followed each change.
    def listed() -> set[str]:
        return {w["worker_id"] for w in (system.health() or {}).get("workers", [])}

    final = wait_until(lambda: (ids := listed()) == live_ids() and ids, 15,
                       lambda: f"/health lists {sorted(listed())}, alive are {sorted(live_ids())}")
    watch.stop.set()
    threads[0].join(timeout=5)
    gone_s: dict[str, list[float]] = {"goodbye": [], "kill": []}
    joined_s: list[float] = []
    for churn in churns:
        last = watch.last_seen.get(churn.left, 0.0)
        bound = GONE_AFTER_GOODBYE_S if churn.kind == "goodbye" else GONE_AFTER_KILL_S
        assert last - churn.at < bound, f"{churn}: still on /health {last - churn.at:.1f}s after it left"
        gone_s[churn.kind].append(max(0.0, last - churn.at))
        first = watch.first_seen.get(churn.joined)
        assert first is not None, f"{churn}: the new worker never appeared on /health"
        assert first - churn.joined_asked_at < JOINED_WITHIN_S, churn
        joined_s.append(first - churn.joined_asked_at)

    # Every request answered, whole.
    failures = [o for o in outcomes if not o.ok]
    router_log = system.router.output()
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed:\n" + "\n".join(
        f"{o.request_id} after {o.seconds:.1f}s: {o.error}\n" + mentions(network, o.request_id) for o in failures[:5])
    assert len(outcomes) >= NUM_CLIENTS, outcomes

    after_load = {f"{p.name}@{p.host.name}": process_figures(p) for p in
                  [system.router, system.broker, system.nats] + [g.process for gs in groups.values() for g in gs]}

    # Every worker process stops cleanly (a hosted one exits 1 if any of its workers failed to start or stop).
    processes = [g.process for gs in groups.values() for g in gs] + [p for a in alone.values() for _, p, _ in a]
    for process in processes:
        process.terminate()
    stop_deadline = time.monotonic() + 20
    for process in processes:
        process.finish(stop_deadline)
    assert [(p.name, p.how_it_ended, p.process.returncode) for p in processes] == \
           [(p.name, "SIGTERM", 0) for p in processes], "\n".join(p.output()[-2000:] for p in processes)

    # Figures: routing decisions and the broker's lookups, from the router's log line of each decision.
    routes = [m.groups() for m in ROUTE_LINE.finditer(router_log)]
    decided_ms = [float(ms) for *_, ms in routes]
    lookup_ms = [float(lookup) for _, _, status, lookup, _ in routes if status == "ok"]
    policy_ms = [float(decided) - float(lookup) for _, _, _, lookup, decided in routes]
    assert decided_ms and lookup_ms, router_log[-3000:]
    metrics = httpx.get(f"{system.base_url}/metrics", timeout=5).text
    counted = re.search(r"^pdserve_route_decision_seconds_count (\S+)", metrics, re.M)
    assert counted and float(counted.group(1)) >= len(outcomes), metrics[-2000:]
    resumes = re.findall(r"resuming on \S+ after \d+ tokens", router_log)
    prefill_retries = re.findall(r"prefill worker \S+ (?:refused|is not listening|failed)", router_log)
    decode_retries = re.findall(r"decode on \S+ failed: no service listens", router_log)
    reasons = collections.Counter(reason for _, reason, *_ in routes)
    pulls = sum(len(re.findall(r"pulled \d+ KV blocks", p.output())) for p in network.processes()
                if "decode" in p.name)
    durations = sorted(o.seconds for o in outcomes)

    p50, p99 = percentiles(decided_ms)
    l50, l99 = percentiles(lookup_ms)
    print(f"\n--- scale with churn: {num_prefill} prefill + {num_decode} decode workers over "
          f"{len(PREFILL_HOSTS) + len(DECODE_HOSTS)} hosts, up in {started_in:.1f}s; "
          f"test {time.monotonic() - began:.0f}s")
    print(f"requests: {len(outcomes)} served in {load_s:.0f}s by {NUM_CLIENTS} streaming clients "
          f"({len(outcomes) / load_s:.1f}/s), all whole; {len(resumes)} streams resumed on another decode worker, "
          f"{len(prefill_retries)} prefills retried elsewhere, {len(decode_retries)} decodes sent to a worker already "
          f"gone (killed, within its heartbeat allowance) sent elsewhere; request p50 "
          f"{percentiles(durations)[0] * 1000:.0f} ms, max {durations[-1] * 1000:.0f} ms")
    print(f"churn: {len(churns)} events ({sum(c.kind == 'goodbye' for c in churns)} goodbye, "
          f"{sum(c.kind == 'kill' for c in churns)} kill -9), each with a join; gone from /health after goodbye "
          f"max {max(gone_s['goodbye'], default=0):.2f}s, after kill -9 max {max(gone_s['kill'], default=0):.2f}s; "
          f"joined max {max(joined_s, default=0):.2f}s; {len(final)} workers listed at the end")
    print(f"routing decision: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(decided_ms)} decisions "
          f"(routes: {', '.join(f'{r} {n}' for r, n in reasons.most_common())}; {pulls} KV pulls)")
    print(f"broker lookup: p50 {l50:.3f} ms, p99 {l99:.3f} ms over {len(lookup_ms)} lookups; the policy after it: "
          f"p50 {percentiles(policy_ms)[0]:.3f} ms, p99 {percentiles(policy_ms)[1]:.3f} ms")
    for name, (rss, cpu) in figures.items():
        print(f"process {name}: RSS {rss:.0f} MiB, CPU {cpu:.2f}s at start"
              + (f"; after the load RSS {after_load[name][0]:.0f} MiB, CPU {after_load[name][1]:.1f}s"
                 if name in after_load else ""))
    for name in ("router@a", "kv-broker@a", "nats@a"):
        print(f"process {name}: after the load RSS {after_load[name][0]:.0f} MiB, CPU {after_load[name][1]:.1f}s")
