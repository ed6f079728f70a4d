"""KV-aware routing vs round-robin (and least-load) on a shared-prefix workload, in one run.

For each routing mode a fresh `pdserve up --engine mock --prefill P --decode D` with prefix caching on every
worker (so no mode inherits another's warm caches), then `pdserve bench` with the same workload: K long shared
prefixes (system prompts), many users each, Poisson arrivals. The mock engine's timing model charges prefill
time per prompt token it must compute (--ms-per-prompt-token), so a prefix-cache hit is cheaper exactly as
on a real engine, and each worker's KV capacity (--num-kv-blocks) holds only some of the prefixes: where a
prefix is sent decides whether it is computed again. Modes run one after the other, --rounds times in
alternating order. Figures per mode: prefix-cache hit rate (prompt tokens the workers found cached, from their
/metrics, over prompt tokens sent), TTFT p50 / p90, TPOT p50, goodput under --slo-ttft-ms / --slo-tpot-ms,
routing decisions by reason; and the ratios of every mode to --baseline (round_robin).

A mode "R+reuse" is routing R with prefix reuse across workers on (a prefill worker pulls a prefix another one has
cached instead of computing it, services/router/prefix_reuse.py); plain "R" runs with reuse off. Its figure
"peer loaded rate" is the share of prompt tokens loaded from a peer. "+host" gives every worker a host-memory KV
tier of --host-cache-gib (kv/host_tier.py: what the engine's cache evicts is kept and copied back instead of
computed); "host loaded rate" is the share of prompt tokens copied back from it ("cache hit rate" counts only
the engines' own caches). "computed rate": prompt tokens the engines computed (recomputes included) over those sent.

    .venv/bin/python benchmarks/kv_routing.py [--num-requests 150] [--rate 3] [--rounds 1] [--out r.json] [--quick]
    .venv/bin/python benchmarks/kv_routing.py --modes kv kv+reuse --baseline kv   # reuse vs none, KV-aware routing
    .venv/bin/python benchmarks/kv_routing.py --modes kv kv+reuse+host --baseline kv   # with the host tier
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from systems import free_port, spawn, stop, wait_ready  # noqa: E402

from pdserve.bench import BenchConfig, run_bench  # noqa: E402
from pdserve.config import MOCK_MODEL  # noqa: E402

# A mode is a routing mode, with "+reuse" where prefill workers may pull a cached prefix from each other
# (--kv-prefix-reuse, services/router/prefix_reuse.py; without it, reuse is off, as before reuse existed), and
# "+host" where every worker has a host-memory KV tier (--kv-host-cache-gib).
ROUTINGS = ("kv", "round_robin", "least_load")
MODES = tuple(f"{r}{extra}" for r in ROUTINGS for extra in ("", "+reuse", "+host", "+reuse+host"))


@contextlib.contextmanager
def mock_system(mode: str, args, log_dir: Path, round_index: int) -> Iterator[str]:
    port = free_port()
    routing, *extras = mode.split("+")
    env = {"PDSERVE_ROUTING": routing, "PDSERVE_KV_PREFIX_REUSE": "1" if "reuse" in extras else "0",
           "PDSERVE_KV_HOST_CACHE_GIB": str(args.host_cache_gib) if "host" in extras else "0",
           "PDSERVE_PREFIX_CACHING": "1", "PDSERVE_NUM_KV_BLOCKS": str(args.num_kv_blocks),
           "PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(args.ms_per_prompt_token),
           "PDSERVE_MOCK_MS_PER_DECODE_STEP": str(args.ms_per_decode_step)}
    log_path = log_dir / f"up-{mode}-{round_index}.log"
    up = spawn([sys.executable, "-m", "pdserve.cli", "up", "--engine", "mock", "--port", str(port),
                 "--prefill", str(args.prefill), "--decode", str(args.decode)], log_path, env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", [(up, log_path)])
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(up)


def scrape(url: str, name: str) -> dict[str, float]:
    """Samples of one metric family from a Prometheus text page: {label text or "": value}."""
    samples = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            samples[key[len(name):]] = float(value)
    return samples


def worker_total(endpoint: str, family: str) -> float:
    """A counter summed over every worker's /metrics."""
    workers = httpx.get(f"{endpoint}/health", timeout=5).json()["workers"]
    return sum(sum(scrape(w["metrics_address"], family).values()) for w in workers if w.get("metrics_address"))


def run_mode(mode: str, args, log_dir: Path, round_index: int) -> dict:
    with mock_system(mode, args, log_dir, round_index) as endpoint:
        config = BenchConfig(endpoint=endpoint, model=MOCK_MODEL, tokenizer="byte", num_requests=args.num_requests,
                             rate=args.rate, seed=args.seed, input_len=args.input_len, output_len=args.output_len,
                             shared_prefix_fraction=args.shared_prefix_fraction, num_prefixes=args.num_prefixes,
                             slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, timeout_s=120)
        result = asyncio.run(run_bench(config))
        hits = worker_total(endpoint, "pdserve_prefix_cache_hit_tokens_total")
        peer = worker_total(endpoint, "pdserve_prefix_peer_loaded_tokens_total")
        host = worker_total(endpoint, "pdserve_prefix_host_loaded_tokens_total")
        computed = worker_total(endpoint, "pdserve_prompt_tokens_computed_total")
        decisions = scrape(f"{endpoint}/metrics", "pdserve_route_decisions_total")
    sent = sum(r["prompt_tokens"] for r in result["requests"])
    return {"bench": result, "cache_hit_rate": hits / sent if sent else None, "cache_hit_tokens": hits,
            "peer_loaded_rate": peer / sent if sent else None, "peer_loaded_tokens": peer,
            "host_loaded_rate": host / sent if sent else None, "host_loaded_tokens": host,
            "computed_rate": computed / sent if sent else None, "computed_tokens": computed,
            "prompt_tokens_sent": sent, "route_decisions": decisions}


def summary(run: dict) -> dict[str, float | None]:
    m = run["bench"]["metrics"]
    return {"cache hit rate": run["cache_hit_rate"], "peer loaded rate": run.get("peer_loaded_rate"),
            "host loaded rate": run.get("host_loaded_rate"), "computed rate": run.get("computed_rate"),
            "ttft p50 ms": m["ttft_ms"]["p50"],
            "ttft p90 ms": m["ttft_ms"]["p90"], "tpot p50 ms": m["tpot_ms"]["p50"],
            "goodput req/s": run["bench"]["goodput"]["requests_per_s"],
            "goodput fraction": run["bench"]["goodput"]["fraction"], "failed": run["bench"]["num_failed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["kv", "round_robin"])
    parser.add_argument("--baseline", choices=MODES, default="round_robin", help="the mode the ratios divide by")
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--rate", type=float, default=3.0, help="Poisson arrivals per second")
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--shared-prefix-fraction", type=float, default=0.75)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--num-kv-blocks", type=int, default=256,
                        help="KV blocks per worker (32 tokens each): with the defaults, 5 of the 8 prefixes fit")
    parser.add_argument("--host-cache-gib", type=float, default=1.0, help="host-memory KV tier per worker (+host modes)")
    parser.add_argument("--ms-per-prompt-token", type=float, default=0.3, help="mock prefill cost per computed token")
    parser.add_argument("--ms-per-decode-step", type=float, default=5.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="each mode this many times, order alternating")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 requests at 6/s, short prompts")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.rate, args.input_len, args.num_prefixes, args.rounds = 12, 6.0, 256, 2, 1
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-kv-routing-"))
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):
        order = args.modes if round_index % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            print(f"kv_routing: round {round_index + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            runs[mode].append(run_mode(mode, args, log_dir, round_index))
    table = {mode: [summary(r) for r in mode_runs] for mode, mode_runs in runs.items()}
    ratios = {}
    if args.baseline in table:
        for mode, rows in table.items():
            ratios[mode] = [{k: (v / rows_b[k] if v is not None and rows_b[k] else None) for k, v in row.items()
                             if k != "failed"} for row, rows_b in zip(rows, table[args.baseline])]
    print(f"\n{args.num_requests} requests at {args.rate}/s, {args.input_len} prompt tokens ({args.shared_prefix_fraction:.0%} "
          f"one of {args.num_prefixes} shared prefixes), {args.output_len} output tokens; {args.prefill}P{args.decode}D mock, "
          f"{args.num_kv_blocks} KV blocks per worker; SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms")
    keys = list(next(iter(table.values()))[0])
    print(f"{'mode / round':18}" + "".join(f"{k:>17}" for k in keys))
    for mode, rows in table.items():
        for i, row in enumerate(rows):
            print(f"{mode + ' ' + str(i + 1):18}" + "".join(f"{v:17.3f}" if v is not None else f"{'-':>17}" for v in row.values()))
    for mode, rows in ratios.items():
        if mode != args.baseline:
            for i, row in enumerate(rows):
                print(f"{mode + '/' + args.baseline + ' ' + str(i + 1):18}" + "".join(
                    f"{v:17.2f}" if v is not None else f"{'-':>17}" for v in row.values()))
    if args.out:
        args.out.write_text(json.dumps({
            "schema": "pdserve.kv_routing/1",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "baseline": args.baseline, "summary": table, "ratios_to_baseline": ratios, "runs": runs,
        }, indent=1))
    return 0 if all(row["failed"] == 0 for rows in table.values() for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
