"""Chaos: a few hundred concurrent requests while workers die, a transfer stalls, clients leave and NATS restarts.

The test owns every process: nats-server on a fixed port (so that it can come back on the same one), the KV
broker, the router and 3 prefill + 3 decode mock workers, each in its own process group. While a closed-loop
load runs (mostly streams; greedy, seeded and stop-string sampling; completions and chats; prompts of 1 to ~20
KV blocks), a schedule of faults hits the system:
  1. kill -9 of a prefill worker the moment it handed KV over (mid-request: the decode's pull of that KV fails
     and recomputes, the prefills queued on it are lost with it);
  2. kill -9 of the decode worker streaming the most requests (they resume elsewhere after the tokens sent);
  3. a stalled transfer: SIGSTOP of a prefill worker the moment it handed KV over, SIGCONT 4 s later (the pull
     times out and decode recomputes, its prefills time out and go elsewhere; it rejoins afterwards);
  4. nats-server stopped and started again on the same port 1 s later (everyone reconnects);
  5. a new prefill and a new decode worker started, which join and serve without restarting anything;
and throughout, some clients close their stream after a few chunks.
Then: every request ended within its deadline (success, a clean OpenAI-shaped error, or dropped by its
client), every success is exactly what the engine predicts (a resumed stream loses and repeats nothing, even
failed and dropped streams only ever showed a prefix of it), every surviving worker holds no KV any more, and
the counts and how long requests took to recover from each fault are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest

from pdserve import nats_server, subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import Prediction, predict
from pdserve.protocol import KVTransferDone, SamplingParams, StatsRequest, WorkerStats
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import Service, free_port, get_json

pytestmark = pytest.mark.e2e

NUM_PREFILL = NUM_DECODE = 3
CONCURRENCY = 48
MIN_REQUESTS = 300
MAX_REQUESTS = 1200  # a bound on the load should the schedule stall; it never comes near
REQUEST_TIMEOUT_S = 20.0
# The router ends a request at its deadline, REQUEST_TIMEOUT_S, or at the latest DEADLINE_GRACE_S later (its HTTP
# layer's safety net); a client that has heard nothing final by CLIENT_DEADLINE_S has a hung request.
DEADLINE_GRACE_S = 2.0
CLIENT_DEADLINE_S = REQUEST_TIMEOUT_S + DEADLINE_GRACE_S + 3
KV_LEASE_S = 5.0
STALL_S = 4.0
NATS_DOWN_S = 1.0

ROUTER_ENV = {
    "PDSERVE_PREFILL_TIMEOUT_S": "3",
    "PDSERVE_DECODE_ACCEPT_TIMEOUT_S": "2",
    "PDSERVE_STREAM_IDLE_TIMEOUT_S": "6",
    "PDSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
}
WORKER_ENV = {
    "PDSERVE_KV_LEASE_S": str(KV_LEASE_S),
    "PDSERVE_KV_PULL_TIMEOUT_S": "2",
    "PDSERVE_HEARTBEAT_INTERVAL_S": "0.5",
    "PDSERVE_MOCK_MS_PER_DECODE_STEP": "20",
    "PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": "0.1",
    # With the prefix cache (on by default) a worker soon touches every page of its KV pool: at the default 2048
    # blocks (1.5 GB of mock KV) nine workers' first touches on this 2-core machine froze decode workers past
    # their heartbeat allowance. 512 blocks hold this load's KV many times over.
    "PDSERVE_NUM_KV_BLOCKS": "512",
}
CLEAN_ERROR_STATUSES = {429, 502, 503, 504}  # overload, worker failures, deadlines; never a 500 or a 4xx of ours


# ------------------------------------------------------------------------------------------ processes


def pid_of(worker_id: str) -> int:
    """Worker ids are role-host-PID-random."""
    return int(worker_id.split("-")[-2])


class Cluster:
    """nats-server on a fixed port and every pdserve service as its own process, all owned by the test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.nats: nats_server.NatsServer | None = None
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.services: list[Service] = []
        self.router: Service | None = None
        self.killed: set[int] = set()  # pids this test killed -9 (expected dead at the end)
        self._names = itertools.count()

    # ---- lifecycle

    def start_nats(self, die_with_parent: bool = True) -> None:
        self.nats = nats_server.start(port=self.nats_port, store_dir=str(self.tmp / "nats"),
                                      log_file=str(self.tmp / "nats.log"), die_with_parent=die_with_parent)

    def stop_nats(self) -> None:
        assert self.nats is not None
        self.nats.stop()

    def start(self, command: str, *args: str, env: dict | None = None) -> Service:
        name = f"{next(self._names):02d}-{command}"
        service = Service([command, "--nats", self.nats_url, *args], str(self.tmp / f"{name}.log"), env)
        self.services.append(service)
        return service

    def start_worker(self, role: str) -> Service:
        return self.start(f"{role}-worker", "--engine", "mock", env=WORKER_ENV)

    def start_all(self) -> None:
        self.start_nats()
        self.start("kv-broker")
        self.router = self.start("router", "--port", str(self.port), env=ROUTER_ENV)
        for role, n in (("prefill", NUM_PREFILL), ("decode", NUM_DECODE)):
            for _ in range(n):
                self.start_worker(role)

    def service_of(self, worker_id: str) -> Service:
        pid = pid_of(worker_id)
        found = [s for s in self.services if s.process.pid == pid]
        assert found, f"{worker_id} is not a process of this test"
        return found[0]

    def signal(self, worker_id: str, sig: signal.Signals) -> None:
        """Signal one of our own workers (never anything else: the pid must be one we started)."""
        os.kill(self.service_of(worker_id).process.pid, sig)
        self.signalled(worker_id, sig)

    def signalled(self, worker_id: str, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL:
            self.killed.add(self.service_of(worker_id).process.pid)

    def stop_all(self) -> None:
        problems = []
        for service in self.services:  # a failed test may have left one frozen
            if service.process.poll() is None:
                os.kill(service.process.pid, signal.SIGCONT)
        # Workers first, then the router and the broker: everyone still alive must stop on SIGTERM.
        for service in sorted(self.services, key=lambda s: s is self.router or "kv-broker" in s.process.args):
            if service.process.pid in self.killed:
                service.process.wait(timeout=5)
                service.log.close()
                continue
            try:
                service.stop(timeout_s=15)
            except AssertionError as e:
                problems.append(str(e))
        if self.nats is not None:
            self.nats.stop()
        assert not problems, problems

    # ---- views

    def health(self) -> dict:
        _, health = get_json(f"{self.base_url}/health")
        return health or {}

    def workers(self, role: str | None = None) -> list[dict]:
        return [w for w in self.health().get("workers", []) if role is None or w["role"] == role]

    def wait_workers(self, num_prefill: int, num_decode: int, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for service in self.services:
                assert service.process.pid in self.killed or service.process.poll() is None, \
                    f"{service.process.args} exited:\n{service.output()[-3000:]}"
            workers = self.workers()
            roles = [w["role"] for w in workers]
            if roles.count("prefill") >= num_prefill and roles.count("decode") >= num_decode:
                return workers
            time.sleep(0.1)
        raise AssertionError(f"workers not up within {timeout_s}s: {self.health()}")


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_all()
        c.wait_workers(num_prefill=NUM_PREFILL, num_decode=NUM_DECODE)
        yield c
    finally:
        c.stop_all()


# ------------------------------------------------------------------------------------------ load


WORDS = ("the prefill worker computes every prompt token once while the decode worker streams new tokens and "
         "a router chooses both from heartbeats over nats with deadlines on every hop").split()


@dataclass
class Spec:
    """One request of the load, fully determined by its index."""

    index: int
    chat: bool
    stream: bool
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...]
    drop_after: int | None  # the client closes the stream after this many events

    @classmethod
    def make(cls, index: int) -> "Spec":
        rng = random.Random(index * 7919 + 17)
        stream = rng.random() < 0.8
        kind = rng.random()
        temperature, seed, stop = 0.0, None, ()
        if kind < 0.4:
            temperature, seed = 0.8, rng.randrange(1 << 30)
        elif kind < 0.55:
            stop = (rng.choice("abcdefghijklmnopqrstuvwxyz") + " ", rng.choice("xyz"))
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 110)))
        return cls(index=index, chat=rng.random() < 0.3, stream=stream, prompt=f"{index}: {prompt}",
                   max_tokens=rng.randint(16, 96), temperature=temperature, seed=seed, stop=stop,
                   drop_after=rng.randint(2, 12) if stream and rng.random() < 0.06 else None)

    @property
    def request_id(self) -> str:
        return f"chaos-{self.index:04d}"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self) -> dict:
        body: dict = {"model": MOCK_MODEL, "max_tokens": self.max_tokens, "temperature": self.temperature,
                      "stream": self.stream}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def expected(self) -> Prediction:
        tokenizer = ByteTokenizer()
        text = tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}]) if self.chat else self.prompt
        return predict(tokenizer.encode(text), SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                                                              seed=self.seed, stop=self.stop))


@dataclass
class Record:
    spec: Spec
    start: float = 0.0  # time.time()
    end: float = 0.0
    outcome: str = "pending"  # ok | error | dropped; broken | hang: a failure of the test
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    max_gap_s: float = 0.0  # the longest wait the client had for its next event (the first one included)
    retry_after_s: float = 0.0  # the answer's Retry-After

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def error_message(body: object) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else str(body)[:300]


def error_shape_problem(body: object) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return f"not the OpenAI error shape: {str(body)[:300]}"
    return None


async def run_request(client: httpx.AsyncClient, base_url: str, rec: Record) -> None:
    spec = rec.spec
    headers = {"X-Request-Id": spec.request_id}
    if not spec.stream:
        r = await client.post(base_url + spec.path, json=spec.body(), headers=headers)
        rec.status = r.status_code
        rec.retry_after_s = float(r.headers.get("retry-after", 0))
        body = r.json()
        if r.status_code == 200:
            choice = body["choices"][0]
            rec.text = choice["message"]["content"] if spec.chat else choice["text"]
            rec.finish_reason = choice["finish_reason"]
            rec.completion_tokens = body["usage"]["completion_tokens"]
            rec.outcome = "ok"
        else:
            rec.error = error_message(body)
            rec.outcome = "error"
            if problem := error_shape_problem(body):
                rec.problems.append(problem)
        return
    async with client.stream("POST", base_url + spec.path, json=spec.body(), headers=headers) as r:
        rec.status = r.status_code
        rec.retry_after_s = float(r.headers.get("retry-after", 0))
        if r.status_code != 200:
            body = json.loads(await r.aread())
            rec.error = error_message(body)
            rec.outcome = "error"
            if problem := error_shape_problem(body):
                rec.problems.append(problem)
            return
        num_events, last = 0, time.monotonic()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            rec.max_gap_s, last = max(rec.max_gap_s, now - last), now
            data = line[len("data: "):]
            if data == "[DONE]":
                if rec.error is not None:
                    rec.outcome = "error"
                elif rec.finish_reason is not None and rec.completion_tokens is not None:
                    rec.outcome = "ok"
                else:
                    rec.problems.append("[DONE] without a finish reason, usage or error event")
                return
            if rec.error is not None:
                rec.problems.append(f"an event after the error event: {data[:200]}")
            event = json.loads(data)
            if "error" in event:
                rec.error = error_message(event)
                if problem := error_shape_problem(event):
                    rec.problems.append(problem)
                continue
            for choice in event["choices"]:
                rec.text += (choice["delta"].get("content") or "") if spec.chat else choice["text"]
                rec.finish_reason = choice["finish_reason"] or rec.finish_reason
            if event.get("usage"):
                rec.completion_tokens = event["usage"]["completion_tokens"]
            num_events += 1
            if spec.drop_after is not None and num_events >= spec.drop_after:
                rec.outcome = "dropped"  # leaving the block closes the connection mid-stream
                return
        rec.problems.append("the stream ended without [DONE] (truncated)")


def check(rec: Record) -> None:
    """What the client saw against what the engine predicts: all of it for a success, a prefix otherwise."""
    expected = rec.spec.expected()
    if rec.outcome == "ok":
        if rec.text != expected.text:
            rec.problems.append(f"text {rec.text!r} != predicted {expected.text!r}")
        if rec.finish_reason != expected.finish_reason:
            rec.problems.append(f"finish_reason {rec.finish_reason} != predicted {expected.finish_reason}")
        if rec.completion_tokens != len(expected.token_ids):
            rec.problems.append(f"completion_tokens {rec.completion_tokens} != predicted {len(expected.token_ids)}")
    elif not expected.text.startswith(rec.text):
        rec.problems.append(f"partial text {rec.text!r} is not a prefix of the prediction {expected.text!r}")
    if rec.latency_s > REQUEST_TIMEOUT_S + DEADLINE_GRACE_S + 1:
        rec.problems.append(f"ended {rec.latency_s:.1f} s after it started, past its deadline")
    if rec.outcome == "error" and rec.status != 200 and rec.status not in CLEAN_ERROR_STATUSES:
        rec.problems.append(f"status {rec.status}: {rec.error}")
    if rec.problems and rec.outcome != "hang":
        rec.outcome = "broken"


async def run_load(base_url: str, records: list[Record], enough: asyncio.Event) -> None:
    """CONCURRENCY clients, each sending one request after the other until MIN_REQUESTS were sent and the
    fault schedule is over (`enough`). Each request has a hard client-side deadline: hitting it is a hang."""
    indices = itertools.count()
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def client_loop() -> None:
            while True:
                index = next(indices)
                if index >= MAX_REQUESTS or (index >= MIN_REQUESTS and enough.is_set()):
                    return
                rec = Record(Spec.make(index), start=time.time())
                records.append(rec)
                try:
                    await asyncio.wait_for(run_request(client, base_url, rec), CLIENT_DEADLINE_S)
                except asyncio.TimeoutError:
                    rec.outcome = "hang"
                    rec.problems.append(f"no end within {CLIENT_DEADLINE_S}s (router deadline {REQUEST_TIMEOUT_S}s)")
                except Exception as e:
                    rec.problems.append(f"{type(e).__name__}: {e}")
                rec.end = time.time()
                check(rec)
                # As OpenAI's clients do: a 429 / 503 that says when to come back (the router while NATS is
                # away, or while every worker is full) is waited out rather than hammered.
                await asyncio.sleep(min(rec.retry_after_s, 5.0))

        await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))


# ------------------------------------------------------------------------------------------ faults


@dataclass
class Fault:
    name: str
    worker_id: str | None
    at: float  # time.time() of the fault
    until: float  # time.time() it was over (the same as `at` for a kill)


# A process of its own that has nothing else to do, so that it reacts to the KV-held event within a fraction of a
# millisecond: sooner than the router can pass the KV on to a decode worker and that worker can start pulling.
# It signals only the pids the test gives it (workers the test started).
SIGNAL_ON_KV_READY = """
import asyncio, os, sys, time
import nats, orjson

async def main(url, signum, targets):
    nc = await nats.connect(url)
    fired = asyncio.get_running_loop().create_future()

    async def on_kv_ready(msg):
        try:
            ready = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        worker_id = ready.get("worker_id")
        if not fired.done() and worker_id in targets and ready.get("num_blocks"):
            os.kill(targets[worker_id], signum)
            fired.set_result(f"{worker_id} {time.time()}")

    await nc.subscribe(sys.argv[4], cb=on_kv_ready)
    await nc.flush()
    print("armed", flush=True)
    print(await fired, flush=True)
    await nc.close()

targets = dict((t.split("=")[0], int(t.split("=")[1])) for t in sys.argv[3].split(","))
asyncio.run(main(sys.argv[1], int(sys.argv[2]), targets))
"""


async def signal_on_kv_ready(cluster: Cluster, worker_ids: set[str], sig: signal.Signals,
                             timeout_s: float = 15) -> tuple[str, float]:
    """Signal whichever of worker_ids (prefill workers) next hands KV over, the moment it announces it; its id
    and when it was signalled."""
    targets = ",".join(f"{i}={cluster.service_of(i).process.pid}" for i in sorted(worker_ids))
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIGNAL_ON_KV_READY, cluster.nats_url, str(int(sig)), targets, subjects.KV_HELD,
        stdout=asyncio.subprocess.PIPE)
    try:
        armed = await asyncio.wait_for(agent.stdout.readline(), timeout_s)
        assert armed == b"armed\n", armed
        worker_id, at = (await asyncio.wait_for(agent.stdout.readline(), timeout_s)).decode().split()
        assert worker_id in worker_ids, worker_id
        cluster.signalled(worker_id, sig)
        await asyncio.wait_for(agent.wait(), timeout_s)
        return worker_id, float(at)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


class TransferWatch:
    """KV pulls that failed (decode recomputed), as decode workers report them."""

    def __init__(self) -> None:
        self.failed: list[KVTransferDone] = []

    async def start(self, bus: Bus) -> None:
        await bus.subscribe(subjects.KV_TRANSFER_DONE, KVTransferDone, self._on_transfer_done)

    async def _on_transfer_done(self, done: KVTransferDone) -> None:
        if not done.ok:
            self.failed.append(done)

    def failed_from(self, worker_id: str) -> list[KVTransferDone]:
        return [d for d in self.failed if d.prefill_worker_id == worker_id]


async def poll(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise AssertionError(f"within {timeout_s}s: {what}")


async def run_faults(cluster: Cluster, transfers: TransferWatch, records: list[Record], faults: list[Fault],
                     served_before: dict[str, int]) -> dict[str, str]:
    """The fault schedule; returns the ids of the workers it touched, by what it did to them."""
    touched: dict[str, str] = {}

    def ended() -> int:
        return sum(r.end > 0 for r in records)

    def live_ids(role: str) -> set[str]:
        return {w["worker_id"] for w in cluster.workers(role)}

    def gone(worker_id: str) -> bool:
        return worker_id not in {w["worker_id"] for w in cluster.workers()}

    await poll(lambda: ended() >= 40, 30, "40 requests served before the first fault")

    # 1. kill -9 a prefill worker right after it handed KV over.
    victim, at = await signal_on_kv_ready(cluster, live_ids("prefill"), signal.SIGKILL)
    faults.append(Fault("kill -9 prefill", victim, at, at))
    touched["killed_prefill"] = victim
    await poll(lambda: gone(victim), 10, f"the router noticed {victim} is gone")
    await asyncio.sleep(1.0)

    # 2. kill -9 the decode worker with the most streams running.
    def busiest_decode() -> dict | None:
        busy = [w for w in cluster.workers("decode") if w["num_running"] > 0]
        return max(busy, key=lambda w: w["num_running"]) if busy else None

    busiest = await poll(busiest_decode, 10, "a decode worker with running requests")
    cluster.signal(busiest["worker_id"], signal.SIGKILL)
    at = time.time()
    faults.append(Fault(f"kill -9 decode ({busiest['num_running']} running)", busiest["worker_id"], at, at))
    touched["killed_decode"] = busiest["worker_id"]
    await poll(lambda: gone(busiest["worker_id"]), 10, f"the router noticed {busiest['worker_id']} is gone")
    await asyncio.sleep(1.0)

    # 3. stall a transfer: freeze a prefill worker right after it handed KV over; thaw it STALL_S later. The
    # decode worker's pull times out within the stall (kv_pull_timeout_s < STALL_S) and it says so: should the
    # pull have been done already (the race is nearly always ours), freeze it again once it is back.
    for attempt in range(3):
        stalled, at = await signal_on_kv_ready(cluster, live_ids("prefill"), signal.SIGSTOP)
        await asyncio.sleep(STALL_S)
        cluster.signal(stalled, signal.SIGCONT)
        faults.append(Fault(f"prefill + transfer frozen {STALL_S:g} s", stalled, at, time.time()))
        touched["stalled_prefill"] = stalled
        await poll(lambda: not gone(stalled), 10, f"{stalled} rejoined after SIGCONT")
        await asyncio.sleep(1.0)  # it finished what it had started before it froze (answers nobody waits for)
        served_before[stalled] = next(w["num_requests_served"] for w in cluster.workers() if w["worker_id"] == stalled)
        if transfers.failed_from(stalled):
            break

    # 4. restart nats-server on the same port.
    expected = {w["worker_id"] for w in cluster.workers()}
    at = time.time()
    await asyncio.to_thread(cluster.stop_nats)
    await asyncio.sleep(NATS_DOWN_S)
    # Started from a helper thread (not to block the load): not tied to that thread's life (PR_SET_PDEATHSIG
    # fires when the thread ends); the fixture stops it.
    await asyncio.to_thread(cluster.start_nats, die_with_parent=False)

    def reconnected() -> bool:
        health = cluster.health()
        return bool(health.get("nats_connected")) and expected <= {w["worker_id"] for w in health.get("workers", [])}

    await poll(reconnected, 15, "the router and every worker reconnected to the restarted nats-server")
    faults.append(Fault(f"nats-server restart (down {NATS_DOWN_S:g} s, all reconnected after {time.time() - at:.1f} s)",
                        None, at, time.time()))
    await asyncio.sleep(1.0)

    # 5. a new prefill and a new decode worker join while the load runs, nothing restarted.
    before = {w["worker_id"] for w in cluster.workers()}
    new = [cluster.start_worker("prefill"), cluster.start_worker("decode")]

    def joined() -> set[str] | None:
        ids = {w["worker_id"] for w in cluster.workers()} - before
        return ids if {pid_of(i) for i in ids} >= {s.process.pid for s in new} else None

    new_ids = await poll(joined, 30, "the new workers joined")
    for worker_id in new_ids:
        touched[f"new_{worker_id.split('-')[0]}"] = worker_id
        served_before.setdefault(worker_id, 0)

    def served_by_new() -> bool:
        served = {w["worker_id"]: w["num_requests_served"] for w in cluster.workers()}
        return all(served.get(i, 0) > 0 for i in new_ids)

    await poll(served_by_new, 15, "the new workers served requests")
    return touched


# ------------------------------------------------------------------------------------------ reports


def router_metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        if line.startswith("pdserve_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def fault_mentions(router: Service, transfers: TransferWatch) -> dict[str, list[str]]:
    """request_id -> what went wrong for it: the router's warnings (which name the worker that failed it) and
    the KV pulls that failed for it."""
    mentions: dict[str, list[str]] = {}
    for line in router.output().splitlines():
        match = re.search(r"WARNING .*?request (chaos-\d+): (.*)$", line)
        if match:
            mentions.setdefault(match.group(1), []).append(match.group(2))
    for done in transfers.failed:
        mentions.setdefault(done.request_id, []).append(f"KV pull from {done.prefill_worker_id} failed: {done.error}")
    return mentions


def recovery_report(records: list[Record], faults: list[Fault], mentions: dict[str, list[str]]) -> list[str]:
    """How long requests took to recover from each fault. For the requests it caught (in flight on the worker, or
    across the NATS restart): how they ended, their extra latency over an unaffected request of the same length
    (a least-squares line of latency over completion length, fitted on requests nothing happened to) and the
    longest wait their client had for the next chunk. Requests sent to a dead worker before the router knew
    bounced at once (no responders); they are counted apart."""
    def hit_by(rec: Record, fault: Fault) -> list[str]:
        if fault.worker_id is None:
            return ["in flight"] if rec.start <= fault.until and rec.end >= fault.at else []
        return [m for m in mentions.get(rec.spec.request_id, ()) if fault.worker_id in m]

    def bounced(rec: Record, fault: Fault) -> bool:
        return all("no service listens" in m for m in hit_by(rec, fault))

    hit = {id(r) for r in records for f in faults if hit_by(r, f)}
    calm = [r for r in records if r.outcome == "ok" and id(r) not in hit and r.spec.request_id not in mentions]
    slope, intercept = np.polyfit([r.completion_tokens for r in calm], [r.latency_s for r in calm], 1)

    def extra_s(rec: Record) -> float:
        return rec.latency_s - (intercept + slope * (rec.completion_tokens or rec.spec.max_tokens))

    def spread(values: list[float]) -> str:
        values = sorted(values)
        return f"median {statistics.median(values):.2f} s, max {values[-1]:.2f} s"

    lines = [f"recovery: unaffected requests ({len(calm)}) take {intercept:.2f} s + {slope * 1000:.1f} ms per completion "
             f"token; their longest chunk wait: {spread([r.max_gap_s for r in calm if r.spec.stream])}"]
    for fault in faults:
        affected = [r for r in records if hit_by(r, fault)]
        caught = [r for r in affected if not bounced(r, fault)]
        ok = [r for r in caught if r.outcome == "ok"]
        outcomes = ", ".join(f"{k} {n}" for k in ("ok", "error", "dropped", "broken", "hang")
                             if (n := sum(r.outcome == k for r in caught)))
        line = f"  {fault.name}: {len(caught)} requests caught ({outcomes or '-'})"
        if ok:
            line += f"; extra latency {spread([extra_s(r) for r in ok])}"
        if streams := [r.max_gap_s for r in ok if r.spec.stream]:
            line += f"; longest chunk wait {spread(streams)}"
        if bounces := [r for r in affected if bounced(r, fault)]:
            extras = [extra_s(r) for r in bounces if r.outcome == "ok"] or [0.0]
            line += f"; {len(bounces)} more bounced at once (extra latency {spread(extras)})"
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------ the test


async def worker_stats(bus: Bus, worker_ids: list[str]) -> dict[str, WorkerStats]:
    replies = await asyncio.gather(*(bus.request(subjects.worker_stats(i), StatsRequest(), WorkerStats, timeout_s=2)
                                     for i in worker_ids), return_exceptions=True)
    return {i: r for i, r in zip(worker_ids, replies) if isinstance(r, WorkerStats)}


async def test_chaos(cluster: Cluster):
    started = time.monotonic()
    bus = await Bus.connect(cluster.nats_url, "chaos-test", connect_timeout_s=10)
    try:
        initial = [w["worker_id"] for w in cluster.workers()]
        baseline = await worker_stats(bus, initial)
        assert set(baseline) == set(initial)
        transfers = TransferWatch()
        await transfers.start(bus)

        records: list[Record] = []
        faults: list[Fault] = []
        served_before: dict[str, int] = {}
        enough = asyncio.Event()
        load = asyncio.create_task(run_load(cluster.base_url, records, enough))
        try:
            touched = await run_faults(cluster, transfers, records, faults, served_before)
        except BaseException:
            load.cancel()
            with contextlib.suppress(BaseException):
                await load
            raise
        finally:
            enough.set()
        await asyncio.wait_for(load, CLIENT_DEADLINE_S + 10)
        load_s = max(r.end for r in records) - min(r.start for r in records)

        # Everyone still alive is the same process as before (nothing restarted), and the KV is all given back.
        for service in cluster.services:
            if service.process.pid not in cluster.killed:
                assert service.process.poll() is None, f"{service.process.args} died:\n{service.output()[-3000:]}"
        surviving_pids = {s.process.pid for s in cluster.services if s.process.pid not in cluster.killed
                          and "-worker" in " ".join(s.process.args)}
        def members_are_survivors() -> set[str] | None:
            ids = {w["worker_id"] for w in cluster.workers()}
            return ids if {pid_of(i) for i in ids} == surviving_pids else None

        survivors = sorted(await poll(members_are_survivors, 10, f"the members are the surviving workers {surviving_pids}"))

        def back_to_baseline(stats: dict[str, WorkerStats]) -> bool:
            """Idle again: nothing running or queued, held blocks and KV usage as before the load (a new worker's
            baseline: nothing held)."""
            return set(stats) == set(survivors) and all(
                s.num_running == 0 and s.num_queued == 0
                and s.num_held_blocks == (baseline[i].num_held_blocks if i in baseline else 0)
                and s.kv_usage == (baseline[i].kv_usage if i in baseline else 0.0)
                for i, s in stats.items())

        deadline = time.monotonic() + KV_LEASE_S + 5
        stats = await worker_stats(bus, survivors)
        while not back_to_baseline(stats) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            stats = await worker_stats(bus, survivors)
        held = {i: (s.num_held_blocks, s.kv_usage, s.num_running, s.num_queued) for i, s in stats.items()}
        settled_s = KV_LEASE_S + 5 - (deadline - time.monotonic())

        # The workers that came back or joined served requests after they (re)joined.
        for worker_id in (touched["stalled_prefill"], touched["new_prefill"], touched["new_decode"]):
            assert stats[worker_id].num_requests_served > served_before[worker_id], (worker_id, stats[worker_id])

        metrics = router_metrics(cluster.base_url)
        mentions = fault_mentions(cluster.router, transfers)
        log_errors = [f"{s.log_path}: {line}" for s in cluster.services for line in s.output().splitlines()
                      if " ERROR " in line or "Traceback" in line]
    finally:
        await bus.close()

    outcomes = {k: sum(r.outcome == k for r in records) for k in ("ok", "error", "dropped", "broken", "hang")}
    retries = {role: metrics.get(f'pdserve_worker_retries_total{{role="{role}"}}', 0.0) for role in ("prefill", "decode")}
    resumes = metrics.get("pdserve_decode_resumes_total", 0.0)
    local_prefills = metrics.get("pdserve_local_prefills_total", 0.0)
    recomputes = sum(s.num_recomputes for s in stats.values())
    errors_by_status: dict[str, int] = {}
    error_messages: dict[str, int] = {}
    for r in records:
        if r.outcome == "error":
            key = str(r.status) if r.status != 200 else "stream error event"
            errors_by_status[key] = errors_by_status.get(key, 0) + 1
            message = re.sub(r"\b(prefill|decode)-\S+?-\d+-[0-9a-f]{4}\b", r"\1-W", r.error or "")
            message = re.sub(r"\d+(\.\d+)?", "N", message)
            error_messages[f"{key}: {message[:160]}"] = error_messages.get(f"{key}: {message[:160]}", 0) + 1
    report = [
        f"chaos: {len(records)} requests in {load_s:.1f} s ({CONCURRENCY} concurrent): {outcomes['ok']} successes, "
        f"{outcomes['error']} clean errors {errors_by_status}, {outcomes['dropped']} dropped by their client, "
        f"{outcomes['broken']} broken, {outcomes['hang']} hung",
        f"retries: prefill {retries['prefill']:.0f}, decode {retries['decode']:.0f}; resumes {resumes:.0f}; "
        f"local prefills {local_prefills:.0f}; KV pulls failed {len(transfers.failed)} (from the killed prefill "
        f"{len(transfers.failed_from(touched['killed_prefill']))}, "
        f"the stalled one {len(transfers.failed_from(touched['stalled_prefill']))}); "
        f"recomputes on surviving decode workers {recomputes}",
        f"faults: " + "; ".join(f"{f.name} {f.worker_id or ''} at +{f.at - records[0].start:.1f} s" for f in faults),
        *recovery_report(records, faults, mentions),
        *(f"  {n} x {message}" for message, n in sorted(error_messages.items(), key=lambda kv: -kv[1])),
        f"KV back to baseline on {len(stats)} surviving workers {settled_s:.1f} s after the load; "
        f"test took {time.monotonic() - started:.0f} s",
    ]
    print("\n" + "\n".join(report))

    broken = [(r.spec.request_id, r.outcome, r.problems) for r in records if r.problems]
    assert not broken, f"{len(broken)} requests broken or hung, e.g. {broken[:5]}\n" + "\n".join(report)
    assert not log_errors, f"{len(log_errors)} errors in the services' logs, e.g.\n" + "\n".join(log_errors[:10])
    assert back_to_baseline(stats), f"KV still held after {KV_LEASE_S + 5}s (held, usage, running, queued): {held}"
    assert len(records) >= MIN_REQUESTS
    assert outcomes["ok"] >= 0.8 * len(records), report[0]
    assert outcomes["dropped"] >= 1
    assert retries["prefill"] >= 1 and retries["decode"] >= 1 and resumes >= 1, report[1]
    assert transfers.failed_from(touched["stalled_prefill"]), "no transfer stalled: every freeze came after the pull"
