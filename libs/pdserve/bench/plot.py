"""The PNG of a run: latency CDFs (TTFT, TPOT, ITL, end-to-end) and output-token throughput per second.

Built on matplotlib's object API with the Agg canvas, never pyplot: no global figure state and no display
backend, so it works on headless machines and inside other programs that import pdserve.bench.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_TITLES = {"ttft_ms": "time to first token", "tpot_ms": "time per output token",
           "itl_ms": "inter-token latency", "e2e_ms": "end-to-end latency"}


def latency_values(result: dict[str, Any], metric: str) -> list[float]:
    rows = [r for r in result["requests"] if r["ok"]]
    if metric == "itl_ms":
        return [gap for r in rows for gap in r["itl_ms"]]
    return [r[metric] for r in rows if r[metric] is not None]


def save_plot(result: dict[str, Any], path: str | Path) -> None:
    """Writes the run's figure as a PNG to `path`."""
    figure = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3, 2)
    for k, metric in enumerate(_TITLES):
        _cdf(figure.add_subplot(grid[k // 2, k % 2]), latency_values(result, metric), metric, result)
    _throughput(figure.add_subplot(grid[2, :]), result)
    figure.suptitle(f"pdserve bench: {result['model']} at {result['endpoint']} ({result['api']}), "
                    f"{result['num_ok']}/{result['num_requests']} ok")
    figure.savefig(path, format="png", dpi=100)


def _cdf(axes, values: list[float], metric: str, result: dict[str, Any]) -> None:
    axes.set_title(_TITLES[metric])
    axes.set_xlabel(metric.replace("_ms", " (ms)"))
    axes.set_ylabel("fraction of samples")
    axes.grid(alpha=0.3)
    if not values:
        axes.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axes.transAxes)
        return
    ordered = np.sort(np.asarray(values, dtype=float))
    axes.step(ordered, np.arange(1, ordered.size + 1) / ordered.size, where="post")
    stats = result["metrics"][metric]
    for key, style in (("p50", ":"), ("p99", "--")):
        axes.axvline(stats[key], color="gray", linestyle=style, label=f"{key} {stats[key]:.1f}")
    slo = result["goodput"].get(f"slo_{metric}")
    if slo is not None:
        axes.axvline(slo, color="red", label=f"SLO {slo:g}")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")


def _throughput(axes, result: dict[str, Any]) -> None:
    bins = result["timeline"]
    axes.bar([b["t_s"] for b in bins], [b["output_tokens"] for b in bins], width=0.9, align="edge")
    axes.axhline(result["throughput"]["output_tokens_per_s"], color="gray", linestyle="--", label="run average")
    axes.set_title("output-token throughput")
    axes.set_xlabel("time since start (s, 1 s bins)")
    axes.set_ylabel("output tokens / s")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(loc="upper right")
