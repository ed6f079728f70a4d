"""Router overhead: what the router and the control plane add per request, measured side by side in one run.

Starts its own system (every process owned by pid and stopped in a `finally`): nats-server, the KV broker,
N prefill and M decode workers on the mock engine with zero simulated time (--mock-ms-per-prompt-token 0
--mock-ms-per-decode-step 0) and the router on a free port. The engine takes no time, so all of a request's
latency is overhead: the router, NATS, the workers' handlers, the real KV transfer of the prompt's blocks
(the mock moves KV-sized payloads over ZeroMQ) and the client itself.

  router (A) : C closed-loop clients stream POST /v1/completions through the router, from one httpx
               AsyncClient (keep-alive, C connections); latency = send -> last byte of the SSE stream.
  direct (B) : the same prompts and max_tokens sent straight to the workers over NATS by a bare client on
               pdserve.bus.Bus (one connection, like the router's) doing per request what the router's
               orchestrator does: PrefillRequest to a prefill worker -> KVReady reply -> DecodeRequest with
               the KV-ready data and this client's token-stream subject -> DecodeAccepted -> TokenChunks on
               one wildcard subscription until the final chunk. Prompts are tokenized beforehand
               (ByteTokenizer, as the router does for the mock engine) and workers are taken round-robin:
               no HTTP, FastAPI, tokenization, routing policy, metrics, spans or log lines.
  A - B      : "router adds": HTTP on both ends, FastAPI, SSE and the orchestrator's own work.
  A alone    : "router + control plane with a zero-time engine".

For each concurrency level the variants alternate (A then B, then B then A, ...) for --rounds rounds of
--requests each, after an unrecorded warm-up (and one unrecorded request per client before each run, which
re-opens HTTP connections the router closed while idle), so machine noise hits both alike. Besides latency
percentiles and requests/s, each run records the CPU time of every process (router, NATS, workers,
broker, this client) per request: a figure that stays meaningful on a busy machine, where latencies do not.
The issue's target (router + control plane add <= 2 ms p50 per request at 32 concurrent streams) is
reported, not asserted. Note that a closed loop at C streams holds C requests in the system, so p50 >= about
C / (requests/s): at C=32, 2 ms p50 needs some 16,000 requests/s.

--out FILE.json: {machine: cpu_count, cpus_usable, cpu_model, platform, python, date, command_line, git_commit,
load averages}, config, processes (pids started and stopped), max_req_per_s {router, direct}, target {met,
router_and_control_plane_p50_ms, router_adds_p50_ms, ...}, and levels[]: {concurrency, router_adds_ms {p50,
p99}, router_adds_ttft_ms, router_adds_ms_per_request, router_adds_cpu_ms_per_request, variants {router,
direct}: {requests, count, failures, errors, latency_ms and ttft_ms {p50, p90, p99, mean, max}, req_per_s,
req_per_s_best_round, ms_per_request, cpu_ms_per_request {router, nats, prefill, decode, kv_broker, client,
total}, rounds[]}}. The exit status is 1 if any request failed.

Usage: python benchmarks/router_overhead.py [--concurrency 1 8 32] [--requests 500] [--rounds 3]
           [--prefill 1] [--decode 1] [--max-tokens 16] [--prompt-tokens 16] [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx
import numpy as np
import orjson

from machine import machine_info  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)
from pdserve import nats_server, subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL, RouterConfig
from pdserve.protocol import (CancelRequest, DecodeAccepted, DecodeRequest, KVReady, PrefillRequest, SamplingParams,
                              TokenChunk)
from pdserve.tokenizer import ByteTokenizer

ROUTER, DIRECT = "router", "direct"
TARGET_CONCURRENCY = 32
TARGET_P50_MS = 2.0
PROMPT_FILLER = "Tell me a short story about the sea, the wind and a small boat. "
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
HTTP_TIMEOUT_S = 60.0


class BenchmarkError(RuntimeError):
    pass


class RequestFailed(Exception):
    pass


# ------------------------------------------------------------------------------------------ the system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    role: str  # router, prefill, decode or kv_broker
    process: subprocess.Popen
    log_path: str

    def tail(self, num_chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-num_chars:]
        except OSError:
            return ""


class System:
    """nats-server, KV broker, mock workers and router as child processes of this one.

    Each child runs in its own session (a Ctrl-C here does not hit it mid-run) and gets SIGTERM if this
    process dies; stop() ends them by pid: SIGTERM, then SIGKILL after a grace period.
    """

    def __init__(self, args: argparse.Namespace, log_dir: str):
        self.args = args
        self.log_dir = log_dir
        self.nats: nats_server.NatsServer | None = None
        self.services: list[Service] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.prefill_ids = [f"bench-prefill-{i}" for i in range(args.prefill)]
        self.decode_ids = [f"bench-decode-{i}" for i in range(args.decode)]

    def start(self) -> None:
        a = self.args
        self.nats = nats_server.start(store_dir=os.path.join(self.log_dir, "nats"), die_with_parent=True,
                                      log_file=os.path.join(self.log_dir, "nats.log"))
        common = ["--nats", self.nats.url, "--log-level", a.log_level]
        worker = [*common, "--engine", "mock", "--advertise-host", "127.0.0.1",
                  "--mock-ms-per-prompt-token", "0", "--mock-ms-per-decode-step", "0"]
        if a.mock_num_layers is not None:
            worker += ["--mock-num-layers", str(a.mock_num_layers)]
        self._spawn("kv-broker", "kv_broker", ["kv-broker", *common])
        for worker_id in self.prefill_ids:
            self._spawn(worker_id, "prefill", ["prefill-worker", *worker, "--worker-id", worker_id])
        for worker_id in self.decode_ids:
            self._spawn(worker_id, "decode", ["decode-worker", *worker, "--worker-id", worker_id])
        self._spawn("router", "router", ["router", *common, "--host", "127.0.0.1", "--port", str(self.port)])

    def _spawn(self, name: str, role: str, argv: list[str]) -> None:
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *argv], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=nats_server.set_parent_death_signal)
        self.services.append(Service(name, role, process, log_path))

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the router's /health lists every worker started here and the broker, and says ok."""
        wanted = set(self.prefill_ids) | set(self.decode_ids)
        deadline = time.monotonic() + timeout_s
        missing = "the router"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                for service in self.services:
                    if service.process.poll() is not None:
                        raise BenchmarkError(f"{service.name} exited with status {service.process.returncode} "
                                             f"during start-up; its log ends:\n{service.tail()}")
                try:
                    health = client.get(f"{self.base_url}/health").json()
                except (httpx.HTTPError, ValueError):
                    health = None
                if health is not None:
                    seen = {w["worker_id"] for w in health.get("workers", [])}
                    missing = ", ".join(sorted(wanted - seen)) or (
                        "the KV broker" if not health.get("kv_brokers") else "") or (
                        "the router's ok" if health.get("status") != "ok" else "")
                    if not missing:
                        return
                time.sleep(0.2)
        raise BenchmarkError(f"{missing} not up within {timeout_s:.0f}s; logs in {self.log_dir}")

    def pids(self) -> dict[str, list[int]]:
        """Process role -> pids (prefill and decode may have several)."""
        roles: dict[str, list[int]] = {"router": [], "nats": [], "prefill": [], "decode": [], "kv_broker": []}
        if self.nats:
            roles["nats"].append(self.nats.process.pid)
        for service in self.services:
            roles[service.role].append(service.process.pid)
        return roles

    def check_alive(self) -> None:
        for service in self.services:
            if service.process.poll() is not None:
                raise BenchmarkError(f"{service.name} exited with status {service.process.returncode} during the "
                                     f"benchmark; its log ends:\n{service.tail()}")

    def stop(self) -> None:
        # Router first (no new requests), then workers and broker, then NATS.
        for service in reversed(self.services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for service in self.services:
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"router_overhead: {service.name} (pid {service.process.pid}) did not stop within "
                      f"{STOP_GRACE_S:.0f}s; killing it", file=sys.stderr)
                service.process.kill()
                service.process.wait()
        if self.nats:
            self.nats.stop()


# ------------------------------------------------------------------------------------------ the clients


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    prompt_token_ids: list[tuple[int, ...]]
    http_bodies: list[bytes]
    max_tokens: int


def make_workload(num_prompts: int, prompt_tokens: int, max_tokens: int) -> Workload:
    """Distinct prompts of prompt_tokens bytes each (one token per byte for the mock's ByteTokenizer)."""
    filler = PROMPT_FILLER * (prompt_tokens // len(PROMPT_FILLER) + 1)
    prompts = [(f"{i:06d} " + filler)[:prompt_tokens] for i in range(num_prompts)]
    tokenizer = ByteTokenizer()  # what the router loads for the mock engine's card (tokenizer "byte")
    bodies = [orjson.dumps({"model": MOCK_MODEL, "prompt": p, "max_tokens": max_tokens, "stream": True})
              for p in prompts]
    return Workload(prompts, [tuple(tokenizer.encode(p)) for p in prompts], bodies, max_tokens)


class RouterClient:
    """Variant A: streamed /v1/completions through the router's HTTP API."""

    def __init__(self, base_url: str, max_connections: int):
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=HTTP_TIMEOUT_S,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, body: bytes) -> float:
        """One request to its last byte; returns perf_counter() at its first body byte (the first token)."""
        first_at = None
        parts = []
        async with self._client.stream("POST", "/v1/completions", content=body,
                                       headers={"content-type": "application/json"}) as response:
            async for part in response.aiter_raw():
                if first_at is None:
                    first_at = time.perf_counter()
                parts.append(part)
            status = response.status_code
        data = b"".join(parts)
        if status != 200:
            raise RequestFailed(f"HTTP {status}: {data[:300]!r}")
        if not data.endswith(b"data: [DONE]\n\n") or b'"finish_reason":"length"' not in data:
            raise RequestFailed(f"stream did not end with finish_reason length and [DONE]: ...{data[-300:]!r}")
        assert first_at is not None
        return first_at


class DirectClient:
    """Variant B: the router's per-request NATS exchange with the workers, and nothing else.

    Per request: PrefillRequest (request/reply, the router's prefill deadline) -> KVReady; DecodeRequest
    carrying the KV-ready data and this client's token-stream subject (request/reply) -> DecodeAccepted;
    then TokenChunks, in order, from one subscription to every stream of this client, until the final one.
    Deadlines and timeouts are the router's defaults (RouterConfig). A request that fails is cancelled on
    its workers, as the router does, and counted as a failure (no retry elsewhere).
    """

    def __init__(self, bus: Bus, prefill_ids: list[str], decode_ids: list[str]):
        self.bus = bus
        self.config = RouterConfig(router_id=f"bench-direct-{uuid.uuid4().hex[:8]}")
        self._prefill_ids = itertools.cycle(prefill_ids)
        self._decode_ids = itertools.cycle(decode_ids)
        self._streams: dict[tuple[str, str], asyncio.Queue[TokenChunk]] = {}

    async def start(self) -> None:
        await self.bus.subscribe(subjects.token_streams(self.config.router_id), TokenChunk, self._on_chunk)

    async def _on_chunk(self, chunk: TokenChunk) -> None:
        queue = self._streams.get((chunk.request_id, chunk.worker_id))
        if queue is not None:
            queue.put_nowait(chunk)

    async def send(self, prompt_token_ids: tuple[int, ...], max_tokens: int) -> float:
        """One request to its final chunk; returns perf_counter() when the first token (KV-ready) came."""
        cfg = self.config
        request_id = f"direct-{uuid.uuid4().hex}"
        deadline = time.time() + cfg.request_timeout_s
        sampling = SamplingParams(max_tokens=max_tokens)  # what the router builds from this HTTP body
        prefill_id = next(self._prefill_ids)
        timeout_s = min(cfg.prefill_timeout_s, deadline - time.time())
        prefill = PrefillRequest(request_id=request_id, model=MOCK_MODEL, prompt_token_ids=prompt_token_ids,
                                 sampling=sampling, deadline=time.time() + timeout_s)
        try:
            ready = await self.bus.request(subjects.prefill_request(prefill_id), prefill, KVReady,
                                           timeout_s=timeout_s, request_id=request_id)
        except Exception:
            await self._cancel(request_id, prefill_id)
            raise
        first_at = time.perf_counter()
        if ready.finish_reason is not None:
            raise RequestFailed(f"prefill finished the request ({ready.finish_reason}); expected {max_tokens} tokens")
        decode_id = next(self._decode_ids)
        stream_key = (request_id, decode_id)
        chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self._streams[stream_key] = chunks
        stream_token = secrets.token_hex(16)  # as the router does; this bare client does not check it
        finished = False
        try:
            decode = DecodeRequest(request_id=request_id, model=MOCK_MODEL, prompt_token_ids=prompt_token_ids,
                                   sampling=sampling, first_token_id=ready.first_token_id,
                                   kv_transfer_params=ready.kv_transfer_params,
                                   stream_subject=subjects.token_stream(cfg.router_id, request_id),
                                   stream_token=stream_token, deadline=deadline)
            await self.bus.request(subjects.decode_request(decode_id), decode, DecodeAccepted,
                                   timeout_s=min(cfg.decode_accept_timeout_s, deadline - time.time()),
                                   request_id=request_id)
            num_tokens = 1  # the first one came with KV-ready
            seq = 0
            while True:
                try:
                    chunk = chunks.get_nowait()
                except asyncio.QueueEmpty:
                    async with asyncio.timeout(min(cfg.stream_idle_timeout_s, deadline - time.time())):
                        chunk = await chunks.get()
                if chunk.seq != seq or chunk.error:
                    raise RequestFailed(f"chunk {chunk.seq} (expected {seq}), error {chunk.error!r}")
                seq += 1
                num_tokens += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    finished = True
                    if chunk.finish_reason != "length" or num_tokens != max_tokens:
                        raise RequestFailed(f"finished ({chunk.finish_reason}) after {num_tokens} tokens, "
                                            f"expected length after {max_tokens}")
                    return first_at
        finally:
            self._streams.pop(stream_key, None)
            if not finished:  # stop the work and free the KV, as the router does
                await self._cancel(request_id, decode_id)
                await self._cancel(request_id, ready.worker_id)

    async def _cancel(self, request_id: str, worker_id: str) -> None:
        await self.bus.publish(subjects.CANCEL, CancelRequest(request_id=request_id, worker_id=worker_id),
                               request_id=request_id)


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    """One variant, one round, at one concurrency."""

    variant: str
    concurrency: int
    num_requests: int
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # process role -> CPU seconds during the run

    @property
    def failures(self) -> int:
        return len(self.errors)


class CpuClock:
    """CPU seconds (user + system, all threads) of every process of the system and of this one, from /proc."""

    def __init__(self, pids: dict[str, list[int]]):
        self._pids = {**pids, "client": [os.getpid()]}
        self._tick_s = 1 / os.sysconf("SC_CLK_TCK")

    def _cpu_s(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone: the run's check_alive() says so
            return 0.0
        return (int(fields[11]) + int(fields[12])) * self._tick_s  # utime, stime (fields 14 and 15 of stat)

    def read(self) -> dict[str, float]:
        return {role: sum(self._cpu_s(pid) for pid in pids) for role, pids in self._pids.items()}


async def closed_loop(send: Callable[[int], Awaitable[float]], first_index: int, num_requests: int,
                      concurrency: int, run: Run) -> None:
    """`concurrency` clients, each sending its next request as soon as its last one ended."""
    indices = iter(range(first_index, first_index + num_requests))

    async def client() -> None:
        for i in indices:  # shared: each request is taken by exactly one client
            started = time.perf_counter()
            try:
                first_at = await send(i)
            except Exception as e:  # counted, and the run goes on: a benchmark reports failures, it does not hide them
                run.errors.append(f"{type(e).__name__}: {e}"[:500])
                continue
            ended = time.perf_counter()
            run.latencies_ms.append((ended - started) * 1000)
            run.ttft_ms.append((first_at - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values)),
            "max": float(np.max(values))}


def summarize(runs: list[Run]) -> dict:
    """One variant at one concurrency, all its rounds pooled."""
    latencies = [x for r in runs for x in r.latencies_ms]
    count = len(latencies)
    wall_s = sum(r.wall_s for r in runs)
    cpu = {role: sum(r.cpu_s.get(role, 0.0) for r in runs) for role in runs[0].cpu_s}
    cpu["total"] = sum(cpu.values())
    errors = sorted({e for r in runs for e in r.errors})
    round_rates = [len(r.latencies_ms) / r.wall_s for r in runs if r.wall_s > 0]
    return {
        "requests": sum(r.num_requests for r in runs),
        "count": count,
        "failures": sum(r.failures for r in runs),
        "errors": errors[:5],
        "latency_ms": percentiles(latencies),
        "ttft_ms": percentiles([x for r in runs for x in r.ttft_ms]),
        "req_per_s": count / wall_s if wall_s > 0 else 0.0,
        "req_per_s_best_round": max(round_rates, default=0.0),
        # wall time per request at this concurrency: what one more request costs the loaded system
        "ms_per_request": 1000 * wall_s / count if count else None,
        "cpu_ms_per_request": {role: 1000 * s / count if count else None for role, s in cpu.items()},
        "rounds": [{"p50_ms": percentiles(r.latencies_ms)["p50"], "p99_ms": percentiles(r.latencies_ms)["p99"],
                    "req_per_s": len(r.latencies_ms) / r.wall_s if r.wall_s > 0 else 0.0, "failures": r.failures}
                   for r in runs],
    }


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


async def measure(args: argparse.Namespace, system: System, log: Callable[[str], None]) -> list[dict]:
    levels = args.concurrency
    # every request of the whole benchmark gets a prompt of its own: warm-ups, refills and runs, both variants
    num_prompts = sum(2 * (args.warmup + args.rounds * (c + args.requests)) for c in levels)
    workload = make_workload(num_prompts, args.prompt_tokens, args.max_tokens)
    next_index = 0

    async def unrecorded(variant: str, c: int, num_requests: int, what: str) -> None:
        nonlocal next_index
        run = Run(variant, c, num_requests)
        await closed_loop(sends[variant], next_index, num_requests, c, run)
        next_index += num_requests
        if run.failures:
            raise BenchmarkError(f"{what} of {variant} at c={c}: {run.failures} failures, first: {run.errors[0]}")

    async with contextlib.AsyncExitStack() as stack:
        router = RouterClient(system.base_url, max(levels))
        stack.push_async_callback(router.close)
        bus = await Bus.connect(system.nats.url, "bench-direct")
        stack.push_async_callback(bus.close)
        direct = DirectClient(bus, system.prefill_ids, system.decode_ids)
        await direct.start()
        sends = {
            ROUTER: lambda i: router.send(workload.http_bodies[i]),
            DIRECT: lambda i: direct.send(workload.prompt_token_ids[i], workload.max_tokens),
        }
        clock = CpuClock(system.pids())
        results = []
        for c in levels:
            if args.warmup:
                for variant in (ROUTER, DIRECT):
                    await unrecorded(variant, c, args.warmup, "warm-up")
            runs: dict[str, list[Run]] = {ROUTER: [], DIRECT: []}
            for round_index in range(args.rounds):
                order = (ROUTER, DIRECT) if round_index % 2 == 0 else (DIRECT, ROUTER)
                for variant in order:
                    # One unrecorded request per client first: the router closes HTTP connections idle for 5 s
                    # (uvicorn's keep-alive) while B runs, and a connection set-up is not a per-request cost.
                    await unrecorded(variant, c, c, "refill")
                    await asyncio.sleep(args.settle_s)  # let the previous run's tail (KV releases, events) finish
                    run = Run(variant, c, args.requests)
                    before = clock.read()
                    await closed_loop(sends[variant], next_index, args.requests, c, run)
                    after = clock.read()
                    next_index += args.requests
                    run.cpu_s = {role: after[role] - before[role] for role in before}
                    runs[variant].append(run)
                    system.check_alive()
                    p = percentiles(run.latencies_ms)
                    log(f"c={c} round {round_index + 1}/{args.rounds} {variant:6s}: "
                        f"p50 {_ms(p['p50'])} p99 {_ms(p['p99'])} ms, "
                        f"{len(run.latencies_ms) / run.wall_s:7.1f} req/s, {run.failures} failures")
            summary = {variant: summarize(variant_runs) for variant, variant_runs in runs.items()}
            a, b = summary[ROUTER], summary[DIRECT]
            results.append({
                "concurrency": c,
                "variants": summary,
                "router_adds_ms": {q: difference(a["latency_ms"][q], b["latency_ms"][q]) for q in ("p50", "p99")},
                "router_adds_ttft_ms": {q: difference(a["ttft_ms"][q], b["ttft_ms"][q]) for q in ("p50", "p99")},
                "router_adds_ms_per_request": difference(a["ms_per_request"], b["ms_per_request"]),
                "router_adds_cpu_ms_per_request": difference(a["cpu_ms_per_request"]["total"],
                                                             b["cpu_ms_per_request"]["total"]),
            })
        return results


# ------------------------------------------------------------------------------------------ reporting


def _ms(value: float | None) -> str:
    return f"{'-':>8s}" if value is None else f"{value:8.2f}"


def target_verdict(levels: list[dict]) -> dict:
    level = next((lv for lv in levels if lv["concurrency"] == TARGET_CONCURRENCY), None)
    verdict = {"concurrency": TARGET_CONCURRENCY, "p50_limit_ms": TARGET_P50_MS,
               "router_and_control_plane_p50_ms": None, "met": None, "router_adds_p50_ms": None,
               "router_adds_met": None}
    if level is None:
        verdict["note"] = f"not measured: run with --concurrency including {TARGET_CONCURRENCY}"
        return verdict
    a_p50 = level["variants"][ROUTER]["latency_ms"]["p50"]
    adds = level["router_adds_ms"]["p50"]
    verdict.update({
        "router_and_control_plane_p50_ms": a_p50, "met": a_p50 is not None and a_p50 <= TARGET_P50_MS,
        "router_adds_p50_ms": adds, "router_adds_met": adds is not None and adds <= TARGET_P50_MS,
    })
    return verdict


def print_report(report: dict) -> None:
    roles = ["router", "nats", "prefill", "decode", "kv_broker", "client", "total"]
    print(f"\nrouter overhead: mock engine with zero simulated time, {report['config']['prefill']}P"
          f"{report['config']['decode']}D, prompts of {report['config']['prompt_tokens']} tokens, "
          f"max_tokens {report['config']['max_tokens']}; {report['machine']['cpu_count']} CPUs")
    print(f"{'':5s} {'variant':8s} {'count':>6s} {'fail':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'ttft p50':>8s} "
          f"{'req/s':>8s} | CPU ms per request, by process")
    print(f"{'':63s} | " + " ".join(f"{r:>8s}" for r in roles))
    for level in report["levels"]:
        c = level["concurrency"]
        for variant in (ROUTER, DIRECT):
            v = level["variants"][variant]
            cpu = " ".join(_ms(v["cpu_ms_per_request"].get(r)) for r in roles)
            print(f"c={c:<3d} {variant:8s} {v['count']:6d} {v['failures']:5d} {_ms(v['latency_ms']['p50'])} "
                  f"{_ms(v['latency_ms']['p99'])} {_ms(v['ttft_ms']['p50'])} {v['req_per_s']:8.1f} | {cpu}")
        adds = level["router_adds_ms"]
        print(f"{'':5s} router adds (A - B): p50 {_ms(adds['p50'])} ms, p99 {_ms(adds['p99'])} ms; "
              f"wall per request {_ms(level['router_adds_ms_per_request'])} ms, "
              f"CPU per request {_ms(level['router_adds_cpu_ms_per_request'])} ms")
    for variant in (ROUTER, DIRECT):
        print(f"max sustained req/s, {variant}: {report['max_req_per_s'][variant]:.1f}")
    t = report["target"]
    if t["met"] is None:
        print(f"target (router + control plane <= {t['p50_limit_ms']:g} ms p50 at {t['concurrency']} streams): "
              f"{t['note']}")
    else:
        print(f"target: router + control plane (A alone, zero-time engine) p50 at {t['concurrency']} streams = "
              f"{t['router_and_control_plane_p50_ms']:.2f} ms, limit {t['p50_limit_ms']:g} ms: "
              f"{'MET' if t['met'] else 'NOT MET'}")
        print(f"        router adds (A - B) p50 at {t['concurrency']} streams = {t['router_adds_p50_ms']:.2f} ms, "
              f"limit {t['p50_limit_ms']:g} ms: {'MET' if t['router_adds_met'] else 'NOT MET'}")


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="concurrent closed-loop clients, one level or several [default 32; quick: 4]; above a "
                        "worker's --max-queue (256) requests are refused")
    p.add_argument("--requests", type=int, default=None, help="requests per variant per round [default 500; quick: 30]")
    p.add_argument("--rounds", type=int, default=None, help="rounds of A and B, alternated [default 3; quick: 2]")
    p.add_argument("--warmup", type=int, default=None,
                   help="unrecorded requests per variant before each level [default 2 x concurrency, at least 20; "
                        "quick: 8]")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers [default 1]")
    p.add_argument("--decode", type=int, default=1, help="decode workers [default 1]")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request [default 16]")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (bytes) [default 16]")
    p.add_argument("--mock-num-layers", type=int, default=None,
                   help="layers of the mock's KV (its size per token) [default: the workers' own, 30 as SmolLM2-135M]")
    p.add_argument("--log-level", default="INFO", help="log level of every service [default INFO, as deployed]")
    p.add_argument("--settle-s", type=float, default=None, help="pause before each run [default 0.2; quick: 0.05]")
    p.add_argument("--log-dir", default=None, help="keep the services' logs here [default: a temporary directory]")
    p.add_argument("--out", default=None, help="write every figure and the machine's description to this JSON file")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds of load")
    args = p.parse_args(argv)
    quick = args.quick
    if args.concurrency is None:
        args.concurrency = [4] if quick else [TARGET_CONCURRENCY]
    if args.requests is None:
        args.requests = 30 if quick else 500
    if args.rounds is None:
        args.rounds = 2 if quick else 3
    if args.warmup is None:
        args.warmup = 8 if quick else max(20, 2 * max(args.concurrency))
    if args.settle_s is None:
        args.settle_s = 0.05 if quick else 0.2
    for name in ("requests", "rounds", "prefill", "decode", "max_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens < 2:
        p.error("--max-tokens must be at least 2 (one token comes from prefill, the rest are streamed by decode)")
    if min(args.concurrency) < 1 or args.warmup < 0:
        p.error("--concurrency must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(f"router_overhead: {message}", file=sys.stderr, flush=True)

    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="pdserve-router-overhead-") as tmp:
        log_dir = args.log_dir or tmp
        os.makedirs(log_dir, exist_ok=True)
        system = System(args, log_dir)
        try:
            system.start()
            processes = system.pids()
            system.wait_ready()
            log(f"system up: router {system.base_url}, {args.prefill}P{args.decode}D mock workers at zero "
                f"simulated time; concurrency {args.concurrency}, {args.rounds} rounds x {args.requests} requests")
            levels = asyncio.run(measure(args, system, log))
        except BenchmarkError as e:
            log(f"failed: {e}")
            return 1
        finally:
            system.stop()
    machine["load_average_at_end"] = list(os.getloadavg())
    report = {
        "benchmark": "router_overhead",
        "machine": machine,
        "config": {"concurrency": args.concurrency, "requests": args.requests, "rounds": args.rounds,
                   "warmup": args.warmup, "prefill": args.prefill, "decode": args.decode,
                   "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                   "mock_num_layers": args.mock_num_layers, "mock_ms_per_prompt_token": 0.0,
                   "mock_ms_per_decode_step": 0.0, "log_level": args.log_level, "quick": args.quick},
        "levels": levels,
        "processes": processes,  # pids of what this run started (and stopped)
        "max_req_per_s": {variant: max(lv["variants"][variant]["req_per_s"] for lv in levels)
                          for variant in (ROUTER, DIRECT)},
        "target": target_verdict(levels),
    }
    print_report(report)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        log(f"figures written to {args.out}")
    num_failed = sum(v["failures"] for lv in levels for v in lv["variants"].values())
    if num_failed:
        log(f"{num_failed} requests failed (first errors in the JSON's `errors`); the figures are not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
