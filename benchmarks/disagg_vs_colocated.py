"""The same workload against pdserve 1P1D, one plain vLLM server, and vLLM's own disaggregation, in one run.

  (a) pdserve      `pdserve up --engine vllm`: prefill on core 0, decode on core 1, KV over pdserve's connector
  (b) vllm         one plain vLLM OpenAI server on the same cores (0-1): the colocated baseline
  (c) vllm-disagg  two vLLM servers with vLLM's built-in ExampleConnector (KV through a shared directory) behind
                   a proxy that prefills on the producer first, as vLLM's disaggregation example does
The systems run one after the other (never two at once: 2 cores), each warmed up with --warmup requests, then
`pdserve bench` drives each with the same prompts (fixed seeds, exact token lengths from the model's tokenizer,
ignore_eos so every request generates exactly its output length), at every --concurrency, with new prompts at
each level and for the warm-up (no system sees a prompt twice). Prints every metric
for each system and the ratio to (b); --out writes everything as JSON.

    .venv/bin/python benchmarks/disagg_vs_colocated.py [--num-requests 24] [--concurrency 1 4] [--input-len 512]
        [--output-len 64] [--systems pdserve vllm vllm-disagg] [--out results.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from systems import SYSTEMS  # noqa: E402

from pdserve.bench import BenchConfig, run_bench  # noqa: E402
from pdserve.models import DEFAULT_MODEL, pull_default_model  # noqa: E402

BASELINE = "vllm"
# (label, path into a pdserve.bench result, lower is better)
ROWS = [(f"{m} {q} ms", ("metrics", f"{m}_ms", q), True)
        for m in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p90", "p99")] + [
    ("2nd-chunk gap p50 ms", ("handoff", "second_chunk_gap_ms", "p50"), True),
    ("2nd gap/later ITL p50", ("handoff", "gap_over_later_itl_median", "p50"), True),
    ("requests/s", ("throughput", "requests_per_s"), False),
    ("output tokens/s", ("throughput", "output_tokens_per_s"), False),
    ("goodput req/s", ("goodput", "requests_per_s"), False),
]


def lookup(result: dict, path: tuple[str, ...]) -> float | None:
    value = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def bench_system(name: str, model_dir: str, args, log_dir: Path) -> dict[str, dict]:
    """Start one system, warm it up, run the workload at every concurrency; results by concurrency."""
    results = {}
    with SYSTEMS[name](model_dir, DEFAULT_MODEL, log_dir) as endpoint:
        common = dict(endpoint=endpoint, model=DEFAULT_MODEL, tokenizer=model_dir, input_len=args.input_len,
                      output_len=args.output_len, ignore_eos=True, timeout_s=args.timeout_s,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
        asyncio.run(run_bench(BenchConfig(**common, num_requests=args.warmup, concurrency=1, seed=args.seed)))
        for level, concurrency in enumerate(args.concurrency):
            print(f"  {name}: {args.num_requests} requests at concurrency {concurrency}", file=sys.stderr, flush=True)
            # New prompts at every level: a prompt seen at an earlier level would be a prefix-cache hit on a
            # system that caches (plain vLLM does by default) and measure the cache, not the architecture.
            config = BenchConfig(**common, num_requests=args.num_requests, concurrency=concurrency,
                                 seed=args.seed + 1000 * (level + 1))
            results[str(concurrency)] = asyncio.run(run_bench(config))
    return results


def example_connector_loads(log_dir: Path, args) -> dict[str, int]:
    """How many requests the consumer really loaded from the shared directory: ExampleConnector logs one
    "Inject KV cache" line per loaded request; a miss (it keys the KV by the prompt's whole blocks minus the
    last token) silently recomputes, which would flatter nothing but must be known."""
    log = (log_dir / "vllm-consumer.log").read_text(errors="replace")
    return {"num_kv_loads": log.count("Inject KV cache"),
            "num_requests": args.warmup + args.num_requests * len(args.concurrency)}


def ratios(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """system -> concurrency -> row label -> value / baseline's value."""
    out: dict = {}
    for name, by_concurrency in results.items():
        for concurrency, result in by_concurrency.items():
            base = results.get(BASELINE, {}).get(concurrency)
            row = {}
            for label, path, _ in ROWS:
                a, b = lookup(result, path), lookup(base, path) if base else None
                row[label] = a / b if a is not None and b else None
            out.setdefault(name, {})[concurrency] = row
    return out


def ratio_lines(results: dict, ratio: dict) -> list[str]:
    """Script-readable lines, per system and concurrency: its hand-off (second chunk's gap over its later
    gaps' median, 1.0 = none) and its inter-token p99 over the baseline's."""
    lines = []
    for name, by_concurrency in results.items():
        for concurrency, result in by_concurrency.items():
            gap = lookup(result, ("handoff", "gap_over_later_itl_median", "p50"))
            if gap is not None:
                lines.append(f"ratio {name}_second_gap/later_itl@c{concurrency} {gap:.2f}")
            p99 = ratio.get(name, {}).get(concurrency, {}).get("itl p99 ms")
            if name != BASELINE and p99 is not None:
                lines.append(f"ratio {name}_itl_p99/{BASELINE}_itl_p99@c{concurrency} {p99:.2f}")
    return lines


def print_table(results: dict, ratio: dict, args) -> None:
    names = list(results)
    for concurrency in map(str, args.concurrency):
        print(f"\nconcurrency {concurrency}: {args.num_requests} requests, {args.input_len} prompt tokens, "
              f"{args.output_len} output tokens, seed {args.seed}")
        header = f"{'metric':22}" + "".join(f"{n:>14}" for n in names)
        header += "".join(f"{n + '/' + BASELINE:>22}" for n in names if n != BASELINE)
        print(header)
        for label, path, _ in ROWS:
            line = f"{label:22}"
            for n in names:
                v = lookup(results[n].get(concurrency, {}), path)
                line += f"{v:14.1f}" if v is not None else f"{'-':>14}"
            for n in names:
                if n != BASELINE:
                    r = ratio.get(n, {}).get(concurrency, {}).get(label)
                    line += f"{r:22.2f}" if r is not None else f"{'-':>22}"
            print(line)
        for n in names:
            failed = results[n].get(concurrency, {}).get("num_failed")
            if failed:
                print(f"  {n}: {failed} failed: {results[n][concurrency].get('errors')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent to each system before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-request deadline")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 requests, 64 in, 8 out, concurrency 1")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.concurrency, args.input_len, args.output_len, args.warmup = 3, [1], 64, 8, 1
    model_dir = str(pull_default_model(quiet=True))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-disagg-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"server logs in {log_dir}", file=sys.stderr)

    results, errors, checks = {}, {}, {}
    for name in args.systems:
        try:
            results[name] = bench_system(name, model_dir, args, log_dir)
            if name == "vllm-disagg":
                checks[name] = example_connector_loads(log_dir, args)
        except RuntimeError as e:  # a system that does not start is reported, the others still run
            errors[name] = str(e)
            print(f"{name}: {e}", file=sys.stderr)
    ratio = ratios(results)
    print_table(results, ratio, args)
    print()
    for line in ratio_lines(results, ratio):
        print(line)
    for name, check in checks.items():
        print(f"\n{name}: {check['num_kv_loads']} of {check['num_requests']} requests loaded their KV on the consumer "
              f"(the rest recomputed the prefill there)")
    for name, error in errors.items():
        print(f"\n{name} did not run: {error.splitlines()[0]}")
    if args.out:
        report = {
            "schema": "pdserve.disagg_vs_colocated/1",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "baseline": BASELINE, "results": results, "ratios_to_baseline": ratio, "errors": errors, "checks": checks,
        }
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
