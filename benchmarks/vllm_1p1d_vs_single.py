"""One request at a time through pdserve 1P1D (vLLM engines) and through one plain vLLM server, in one run.

Both serve the same model (the default SmolLM2-135M-Instruct, fp32, 32-token blocks, eager) on the same
machine, one after the other: `pdserve up --engine vllm` (prefill pinned to one core, decode to another)
and `python -m vllm.entrypoints.openai.api_server` (both cores, or --plain-cores). For each, N streamed completions of the same
prompts (greedy): time to first token, decode tokens per second after the first token, end to end; for
pdserve also the KV transfer time per request from the decode worker's counters. Prints medians and the
ratios pdserve / plain vLLM.

    .venv/bin/python benchmarks/vllm_1p1d_vs_single.py [--requests 8] [--prompt-tokens 400] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import httpx

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.models import DEFAULT_MODEL, pull_default_model
from pdserve.protocol import StatsRequest, WorkerStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def measure(base_url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    results = []
    with httpx.Client(timeout=300) as client:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            num_tokens = 0
            with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if '"text":' in line and first is None:
                        first = time.perf_counter()
                    if '"usage":{' in line:
                        num_tokens = int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0])
            end = time.perf_counter()
            results.append({"ttft_ms": (first - start) * 1000, "e2e_ms": (end - start) * 1000,
                            "decode_tok_s": (num_tokens - 1) / (end - first) if num_tokens > 1 else 0.0})
    return results


def decode_stats(nats_url: str, worker_id: str) -> WorkerStats:
    async def ask() -> WorkerStats:
        bus = await Bus.connect(nats_url, "bench")
        try:
            return await bus.request(subjects.worker_stats(worker_id), StatsRequest(), WorkerStats, timeout_s=10)
        finally:
            await bus.close()
    return asyncio.run(ask())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=400, help="roughly: words in each prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--plain-cores", default="0-1",
                        help="cores of the plain vLLM server (pdserve pins prefill and decode to one core each)")
    args = parser.parse_args()
    model_dir = pull_default_model(quiet=True)
    words = "the quick brown fox jumps over a lazy dog while rivers flow to the sea".split()
    prompts = [f"Request {i}: " + " ".join(words[(i + j) % len(words)] for j in range(args.prompt_tokens))
               for i in range(args.requests + 1)]  # the first request of each system warms it up

    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--engine", "vllm", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log_lines: list[str] = []
    try:
        deadline = time.monotonic() + 600
        for line in up.stdout:
            log_lines.append(line)
            if "ready:" in line or time.monotonic() > deadline:
                break
        nats_url = next(l.split("NATS at ")[1].split(";")[0] for l in log_lines if "NATS at " in l)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        decode_id = next(w["worker_id"] for w in health["workers"] if w["role"] == "decode")
        measure(f"http://127.0.0.1:{port}", DEFAULT_MODEL, prompts[:1], args.max_tokens)
        before = decode_stats(nats_url, decode_id)
        pd = measure(f"http://127.0.0.1:{port}", DEFAULT_MODEL, prompts[1:], args.max_tokens)
        after = decode_stats(nats_url, decode_id)
    finally:
        stop(up)
    transfers = args.requests
    kv_ms = (after.kv_transfer_ms - before.kv_transfer_ms) / transfers
    kv_mb = (after.num_kv_bytes_received - before.num_kv_bytes_received) / transfers / 1e6
    recomputes = after.num_recomputes - before.num_recomputes

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": args.plain_cores}
    plain = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
         DEFAULT_MODEL, "--dtype", "float32", "--block-size", "32", "--enforce-eager", "--max-model-len", "4096",
         "--port", str(port), "--disable-log-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", plain, 600)
        measure(f"http://127.0.0.1:{port}", DEFAULT_MODEL, prompts[:1], args.max_tokens)
        single = measure(f"http://127.0.0.1:{port}", DEFAULT_MODEL, prompts[1:], args.max_tokens)
    finally:
        stop(plain)

    print(f"{args.requests} requests one at a time, ~{args.prompt_tokens}-word prompts, {args.max_tokens} tokens, greedy; "
          f"plain vLLM on cores {args.plain_cores}, pdserve prefill and decode on one core each")
    print(f"{'metric (median)':24} {'pdserve 1P1D':>14} {'plain vLLM':>12} {'ratio':>8}")
    for key in ("ttft_ms", "decode_tok_s", "e2e_ms"):
        a, b = statistics.median(r[key] for r in pd), statistics.median(r[key] for r in single)
        print(f"{key:24} {a:14.1f} {b:12.1f} {a / b:8.2f}")
    print(f"KV transfer per request: {kv_ms:.1f} ms for {kv_mb:.2f} MB; recomputes: {recomputes}")


if __name__ == "__main__":
    main()
