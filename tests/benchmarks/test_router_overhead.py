"""Smoke test of benchmarks/router_overhead.py: a --quick run (as a script, from the repository root) writes
JSON that is complete and agrees with itself, and leaves no process behind. No timing thresholds: benchmarks
never gate CI on a timing."""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.reports import strict_json
from tests.e2e.conftest import alive

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180
VARIANTS = ("router", "direct")

pytestmark = pytest.mark.e2e




@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("router_overhead") / "tmp.json"
    proc = subprocess.run([sys.executable, "benchmarks/router_overhead.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return strict_json(out.read_text()), proc.stdout


def test_run_describes_machine_and_command(quick_run):
    report, _ = quick_run
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["platform"]
    assert datetime.datetime.fromisoformat(machine["date"]).tzinfo is not None
    assert "benchmarks/router_overhead.py" in machine["command_line"] and "--quick" in machine["command_line"]
    assert report["config"]["mock_ms_per_prompt_token"] == 0 and report["config"]["mock_ms_per_decode_step"] == 0


def test_every_request_of_both_variants_succeeded(quick_run):
    report, _ = quick_run
    config = report["config"]
    sent = config["rounds"] * config["requests"]
    assert [level["concurrency"] for level in report["levels"]] == config["concurrency"]
    for level in report["levels"]:
        assert set(level["variants"]) == set(VARIANTS)
        for name, v in level["variants"].items():
            assert v["failures"] == 0 and not v["errors"], (level["concurrency"], name, v["errors"])
            assert v["requests"] == v["count"] == sent, (level["concurrency"], name)
            assert len(v["rounds"]) == config["rounds"]


def test_figures_are_positive_and_ordered(quick_run):
    report, stdout = quick_run
    for level in report["levels"]:
        for name, v in level["variants"].items():
            lat, ttft = v["latency_ms"], v["ttft_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], (name, lat)
            assert 0 < ttft["p50"] <= lat["p50"] and ttft["p99"] <= lat["p99"], (name, ttft, lat)  # first token <= last
            assert 0 < v["req_per_s"] <= v["req_per_s_best_round"] * (1 + 1e-9), name
            assert v["cpu_ms_per_request"]["total"] > 0, name
            assert any(line.startswith(f"c={level['concurrency']}") and f" {name} " in line
                       for line in stdout.splitlines()), (name, stdout)


def test_router_adds_is_router_minus_direct(quick_run):
    report, _ = quick_run
    for level in report["levels"]:
        a, b = level["variants"]["router"], level["variants"]["direct"]
        for q in ("p50", "p99"):
            assert math.isclose(level["router_adds_ms"][q], a["latency_ms"][q] - b["latency_ms"][q], abs_tol=1e-9)
        # the direct client bypasses the router: its requests cost the router process (next to) nothing
        assert b["cpu_ms_per_request"]["router"] < a["cpu_ms_per_request"]["router"]
    assert report["max_req_per_s"]["router"] == max(lv["variants"]["router"]["req_per_s"] for lv in report["levels"])
    target = report["target"]
    assert target["concurrency"] == 32 and target["p50_limit_ms"] == 2.0
    if target["met"] is not None:
        assert target["met"] == (target["router_and_control_plane_p50_ms"] <= 2.0)


def test_no_process_left_behind(quick_run):
    report, _ = quick_run
    pids = [pid for role_pids in report["processes"].values() for pid in role_pids]
    assert len(pids) >= 5  # NATS, broker, one prefill, one decode, router
    assert os.getpid() not in pids
    assert not [pid for pid in pids if alive(pid)]
