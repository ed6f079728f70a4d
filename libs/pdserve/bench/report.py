"""The result of a run (schema "pdserve.bench/1"): statistics, throughput, goodput, timeline, summary table.

Latency statistics, throughput and the timeline count successful requests only, as vLLM's and Dynamo's
benchmarks do: a request that failed half-way has no end-to-end latency, and its tokens reached no one.
Failed requests are counted in `num_failed`, by error text in `errors`, and listed in `requests`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from pdserve.bench.client import RequestResult
from pdserve.bench.config import BenchConfig

SCHEMA = "pdserve.bench/1"
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, p50, p90, p99 (numpy's linear percentiles), min, max, count; None values when empty."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None, "count": 0}
    array = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"mean": float(array.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(array.min()), "max": float(array.max()), "count": int(array.size)}


def meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Finished, and within every SLO given; a one-token answer has no TPOT and cannot miss that SLO."""
    if not result.ok:
        return False
    ttft, tpot = result.ttft_ms, result.tpot_ms
    if slo_ttft_ms is not None and (ttft is None or ttft > slo_ttft_ms):
        return False
    return slo_tpot_ms is None or tpot is None or tpot <= slo_tpot_ms


def token_times(result: RequestResult) -> list[tuple[float, int]]:
    """(time, tokens) per text chunk: the request's output tokens spread over its chunks, exact in sum."""
    times = result.chunk_times_s
    if not times:
        return []
    each, extra = divmod(result.output_tokens, len(times))
    return [(t, each + (1 if i < extra else 0)) for i, t in enumerate(times)]


def timeline(results: Sequence[RequestResult], duration_s: float) -> list[dict[str, int]]:
    """Output tokens streamed and requests finished in each whole second of the run (empty seconds too)."""
    num_bins = max(1, math.ceil(duration_s))
    tokens, done = [0] * num_bins, [0] * num_bins
    for r in results:
        if not r.ok:
            continue
        for t, n in token_times(r):
            tokens[min(int(t), num_bins - 1)] += n
        done[min(int(r.end_s), num_bins - 1)] += 1
    return [{"t_s": t, "output_tokens": tokens[t], "requests_done": done[t]} for t in range(num_bins)]


def handoff(ok: Sequence[RequestResult]) -> dict[str, Any]:
    """The gap between a request's first and second streamed chunk, where a disaggregated server hands the
    request from its prefill worker to its decode worker, in ms and over the median of the same request's later
    gaps (1.0: no hand-off cost); stats over the requests with at least three text chunks."""
    gaps, ratios = [], []
    for r in ok:
        itl = r.itl_ms
        if len(itl) >= 2 and (later := float(np.median(itl[1:]))) > 0:
            gaps.append(itl[0])
            ratios.append(itl[0] / later)
    return {"second_chunk_gap_ms": stats(gaps), "gap_over_later_itl_median": stats(ratios)}


def build_result(config: BenchConfig, model: str, started_at: str, duration_s: float,
                 results: Sequence[RequestResult]) -> dict[str, Any]:
    """The run's result dict (schema "pdserve.bench/1"); `results` in any order."""
    results = sorted(results, key=lambda r: r.index)
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown error" for r in results if not r.ok)
    num_good = sum(meets_slo(r, config.slo_ttft_ms, config.slo_tpot_ms) for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    return {
        "schema": SCHEMA,
        "endpoint": config.base_url,
        "model": model,
        "api": config.api,
        "config": config.as_dict(),
        "started_at": started_at,
        "duration_s": duration_s,
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": dict(errors.most_common()),
        "metrics": {
            "ttft_ms": stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
            "tpot_ms": stats([r.tpot_ms for r in ok if r.tpot_ms is not None]),
            "itl_ms": stats([gap for r in ok for gap in r.itl_ms]),
            "e2e_ms": stats([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        },
        "throughput": {
            "requests_per_s": len(ok) * per_s,
            "output_tokens_per_s": output_tokens * per_s,
            "total_tokens_per_s": (prompt_tokens + output_tokens) * per_s,
        },
        "goodput": {
            "requests_per_s": num_good * per_s,
            "fraction": num_good / len(results) if results else 0.0,
            "slo_ttft_ms": config.slo_ttft_ms,
            "slo_tpot_ms": config.slo_tpot_ms,
        },
        "handoff": handoff(ok),
        "timeline": timeline(results, duration_s),
        "requests": [_request_row(r) for r in results],
    }


def _request_row(r: RequestResult) -> dict[str, Any]:
    return {"index": r.index, "prefix_id": r.prefix_id, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "max_tokens": r.max_tokens, "start_s": r.start_s,
            "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms, "itl_ms": r.itl_ms,
            "ok": r.ok, "error": r.error}


def summary_table(result: dict[str, Any]) -> str:
    """A short plain-text summary of a result dict, for a terminal."""
    config = result["config"]
    if config.get("rate"):
        cap = f", at most {config['concurrency']} in flight" if config.get("concurrency") else ""
        load = f"Poisson {config['rate']:g} req/s{cap}"
    else:
        load = f"concurrency {config.get('concurrency') or 1}"
    lines = [
        f"pdserve bench: {result['endpoint']}  model {result['model']}  api {result['api']}  {load}",
        f"requests: {result['num_ok']} ok, {result['num_failed']} failed of {result['num_requests']}"
        f" in {result['duration_s']:.2f} s",
    ]
    for error, count in list(result["errors"].items())[:5]:
        lines.append(f"  {count} x {error}")
    header = f"{'':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}"
    lines += ["", header]
    for name in METRICS:
        s = result["metrics"][name]
        cells = "".join(f"{_num(s[key]):>10}" for key in ("mean", "p50", "p90", "p99", "max"))
        lines.append(f"{name:<10}{cells}")
    gap = result.get("handoff", {}).get("gap_over_later_itl_median", {})
    if gap.get("p50") is not None:
        lines.append(f"hand-off: 2nd chunk's gap p50 {result['handoff']['second_chunk_gap_ms']['p50']:.2f} ms = "
                     f"{gap['p50']:.2f}x the later gaps' median (p90 {gap['p90']:.2f}x)")
    throughput, goodput = result["throughput"], result["goodput"]
    slos = ", ".join(f"{key.removeprefix('slo_')} <= {goodput[key]:g}"
                     for key in ("slo_ttft_ms", "slo_tpot_ms") if goodput[key] is not None) or "no SLO"
    lines += [
        "",
        f"throughput: {throughput['requests_per_s']:.2f} req/s, {throughput['output_tokens_per_s']:.1f} output tok/s, "
        f"{throughput['total_tokens_per_s']:.1f} total tok/s",
        f"goodput:    {goodput['requests_per_s']:.2f} req/s ({goodput['fraction']:.1%} of requests; {slos})",
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
