"""`pdserve bench`: a load generator for any OpenAI-compatible endpoint.

    from pdserve.bench import BenchConfig, run_bench, summary_table
    result = await run_bench(BenchConfig(endpoint="http://127.0.0.1:8000", concurrency=8))
    print(summary_table(result))

`result` is a dict with schema "pdserve.bench/1" (see report.py); `pdserve.bench.plot.save_plot` draws it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pdserve.bench.config import BenchConfig, BenchConfigError

__all__ = ["BenchConfig", "BenchConfigError", "BenchError", "run_bench", "summary_table"]

# Loaded on first use: numpy and httpx would otherwise add a quarter second to every `pdserve` command,
# since the CLI builds the bench subparser each time.
_LAZY = {"BenchError": "pdserve.bench.runner", "run_bench": "pdserve.bench.runner",
         "summary_table": "pdserve.bench.report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
