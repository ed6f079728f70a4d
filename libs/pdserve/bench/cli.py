"""`pdserve bench`: drive an OpenAI-compatible endpoint and report TTFT/TPOT/ITL, throughput and goodput.

    pdserve bench [--endpoint http://127.0.0.1:8000] [--api completions|chat] [--model NAME]
                  [--num-requests 100] [--concurrency N | --rate R [--concurrency CAP]] [--seed 0]
                  [--input-len 256 --input-len-dist fixed|uniform|normal|lognormal --input-len-spread 0.25]
                  [--output-len 128 --output-len-dist ... --output-len-spread 0.25] [--ignore-eos]
                  [--shared-prefix-fraction F --num-prefixes K] [--tokenizer DIR|byte]
                  [--slo-ttft-ms MS] [--slo-tpot-ms MS] [--timeout-s 300] [--api-key KEY]
                  [--out result.json] [--plot result.png] [--no-progress]

Exit status: 0 when at least one request succeeded; 1 when every request failed; 2 when the options are
wrong or the run could not start (endpoint unreachable, no model listed, tokenizer missing).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from pdserve.bench.config import APIS, LENGTH_DISTS, BenchConfig, BenchConfigError

_DEFAULTS = BenchConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field (dest = the field's name), defaults taken from BenchConfig."""
    d = _DEFAULTS
    parser.add_argument("--endpoint", metavar="URL", default=d.endpoint,
                        help=f"base URL of the OpenAI-compatible server, with or without /v1 [default {d.endpoint}]")
    parser.add_argument("--api", choices=APIS, default=d.api, help=f"which endpoint to call [default {d.api}]")
    parser.add_argument("--model", metavar="NAME", default=None,
                        help="model name [default: the first id from GET /v1/models]")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help="sent as 'Authorization: Bearer KEY' (redacted in --out)")
    load = parser.add_argument_group("load")
    load.add_argument("--num-requests", metavar="N", type=int, default=d.num_requests,
                      help=f"[default {d.num_requests}]")
    load.add_argument("--concurrency", metavar="N", type=int, default=None,
                      help="closed loop: keep N requests in flight [default 1]; with --rate: the most in flight")
    load.add_argument("--rate", metavar="R", type=float, default=None,
                      help="open loop: Poisson arrivals at R requests per second")
    load.add_argument("--seed", metavar="N", type=int, default=d.seed,
                      help=f"seeds prompts, lengths and arrivals [default {d.seed}]")
    load.add_argument("--timeout-s", metavar="S", type=float, default=d.timeout_s,
                      help=f"deadline of each request, first byte to last [default {d.timeout_s:g}]")
    shape = parser.add_argument_group("workload")
    for name in ("input", "output"):
        mean = getattr(d, f"{name}_len")
        dist, spread = getattr(d, f"{name}_len_dist"), getattr(d, f"{name}_len_spread")
        shape.add_argument(f"--{name}-len", metavar="N", type=int, default=mean,
                           help=f"mean {name} tokens [default {mean}]")
        shape.add_argument(f"--{name}-len-dist", choices=LENGTH_DISTS, default=dist,
                           help=f"distribution of {name} lengths [default {dist}]")
        shape.add_argument(f"--{name}-len-spread", metavar="X", type=float, default=spread,
                           help="relative spread: half-width / mean (uniform), std / mean (normal, lognormal) "
                                f"[default {spread:g}]")
    shape.add_argument("--shared-prefix-fraction", metavar="F", type=float, default=d.shared_prefix_fraction,
                       help="share of each prompt's input tokens that is a common prefix [default 0]")
    shape.add_argument("--num-prefixes", metavar="K", type=int, default=d.num_prefixes,
                       help="distinct shared prefixes; each request picks one [default 1]")
    shape.add_argument("--tokenizer", metavar="DIR", default=None,
                       help="local Hugging Face model directory (or 'byte' for pdserve's mock engine) for prompts "
                            "of exact token counts [default: one common English word per token]")
    shape.add_argument("--ignore-eos", action="store_true",
                       help="send ignore_eos=true so every answer runs to max_tokens (vLLM honours it)")
    slo = parser.add_argument_group("goodput")
    slo.add_argument("--slo-ttft-ms", metavar="MS", type=float, default=None,
                     help="a request meets the SLO with TTFT at most this")
    slo.add_argument("--slo-tpot-ms", metavar="MS", type=float, default=None,
                     help="a request meets the SLO with TPOT at most this")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="FILE.json", type=Path, default=None,
                     help="write the full result as JSON to this file")
    out.add_argument("--plot", metavar="FILE.png", type=Path, default=None,
                     help="write latency CDFs and throughput over time as PNG")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(BenchConfig)})


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except BenchConfigError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from pdserve.bench.report import summary_table
    from pdserve.bench.runner import BenchError, run_bench

    show = not args.no_progress and sys.stderr.isatty()
    with tqdm(total=config.num_requests, desc="requests", unit="req", file=sys.stderr, disable=not show) as bar:
        try:
            result = asyncio.run(run_bench(config, on_request_done=lambda _: bar.update()))
        except BenchError as e:
            bar.close()
            print(f"pdserve bench: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            bar.close()
            print("pdserve bench: interrupted, no result written", file=sys.stderr)
            return 130
    print(summary_table(result))
    try:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"result: {args.out}")
        if args.plot is not None:
            from pdserve.bench.plot import save_plot

            save_plot(result, args.plot)
            print(f"plot: {args.plot}")
    except OSError as e:
        print(f"pdserve bench: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0 if result["num_ok"] else 1
