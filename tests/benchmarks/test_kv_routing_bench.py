"""Smoke test of benchmarks/kv_routing.py --quick: both routing modes ran on their own system and the report adds up.

No timing is asserted (benchmarks never gate CI on one); only that every request was served, the cache hit rate
is a rate, and the ratios are what the figures say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_quick_run_compares_kv_aware_routing_with_round_robin(tmp_path):
    out = tmp_path / "kvr.json"
    run = subprocess.run([sys.executable, "benchmarks/kv_routing.py", "--quick", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "pdserve.kv_routing/1" and set(report["summary"]) == {"kv", "round_robin"}
    for mode, rows in report["summary"].items():
        (row,) = rows
        assert row["failed"] == 0
        assert 0 <= row["cache hit rate"] <= 1 and row["ttft p50 ms"] <= row["ttft p90 ms"]
        bench = report["runs"][mode][0]["bench"]
        assert bench["num_ok"] == bench["num_requests"] == 12
        assert report["runs"][mode][0]["prompt_tokens_sent"] == 12 * 256
        assert sum(report["runs"][mode][0]["route_decisions"].values()) >= 12  # every request was routed once
        ratio = report["ratios_to_baseline"][mode][0]["ttft p50 ms"]
        assert ratio == pytest.approx(row["ttft p50 ms"] / report["summary"]["round_robin"][0]["ttft p50 ms"])
    assert "kv/round_robin" in run.stdout
