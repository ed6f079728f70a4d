"""Smoke test of benchmarks/disagg_vs_colocated.py: all three systems at tiny size, well-formed results.

Starts five real vLLM engines one after the other (pdserve's two, the plain server, vLLM's producer and
consumer); no timing is asserted, only that every system answered every request and the report adds up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_system_with_ratios_to_plain_vllm(tmp_path):
    out = tmp_path / "dvc.json"
    run = subprocess.run([sys.executable, "benchmarks/disagg_vs_colocated.py", "--quick", "--out", str(out),
                          "--log-dir", str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True, timeout=880)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "pdserve.disagg_vs_colocated/1" and report["errors"] == {}
    assert set(report["results"]) == {"pdserve", "vllm", "vllm-disagg"}
    for name, by_concurrency in report["results"].items():
        result = by_concurrency["1"]
        assert result["num_requests"] == result["num_ok"] == 3, (name, result["errors"])
        for request in result["requests"]:
            assert request["output_tokens"] == 8, (name, request)  # ignore_eos: exactly the output length
            assert 0 < request["ttft_ms"] <= request["e2e_ms"]
        ratios = report["ratios_to_baseline"][name]["1"]
        ttft, base = result["metrics"]["ttft_ms"]["p50"], report["results"]["vllm"]["1"]["metrics"]["ttft_ms"]["p50"]
        assert ratios["ttft p50 ms"] == pytest.approx(ttft / base)
    assert all(r == pytest.approx(1.0) for r in report["ratios_to_baseline"]["vllm"]["1"].values())
    check = report["checks"]["vllm-disagg"]
    assert check["num_requests"] == 4 and 0 <= check["num_kv_loads"] <= 4
    assert "ttft p50 ms" in run.stdout
    assert "ratio pdserve_second_gap/later_itl@c1 " in run.stdout and "ratio pdserve_itl_p99/vllm_itl_p99@c1 " in run.stdout
