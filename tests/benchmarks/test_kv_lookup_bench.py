"""Smoke test of benchmarks/kv_lookup.py: a --quick run (as a script, from the repository root) writes JSON
that is complete and agrees with itself, and leaves no process behind. No timing thresholds: benchmarks
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
CASES = ("all_hold_all", "shared_prefix", "distinct_prefixes", "miss")
STATS = ("p50", "p90", "p99", "mean", "max", "n")




@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("kv_lookup") / "kv_lookup.json"
    proc = subprocess.run([sys.executable, "benchmarks/kv_lookup.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return strict_json(out.read_text()), proc.stdout


def assert_stats(stats: dict, n: int) -> None:
    assert set(STATS) <= set(stats)
    assert stats["n"] == n
    assert all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("p50", "p90", "p99", "mean", "max")), stats
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_the_run_describes_the_machine_the_command_and_the_sizes_asked_for(quick_run):
    report, _ = quick_run
    assert report["benchmark"] == "kv_lookup"
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["platform"]
    assert datetime.datetime.fromisoformat(machine["date"]).tzinfo is not None
    assert "benchmarks/kv_lookup.py" in machine["command_line"] and "--quick" in machine["command_line"]
    config = report["config"]
    assert (config["workers"], config["blocks"], config["block_size"], config["quick"]) == (100, 1024, 32, True)
    index = report["index"]
    assert index["num_blocks"] >= config["blocks"] and index["num_worker_blocks"] > config["workers"] * config["blocks"]


def test_every_case_has_percentiles_in_process_and_over_nats_and_the_answers_agree(quick_run):
    report, stdout = quick_run
    config = report["config"]
    assert report["answers_agree"] is True
    for case in CASES:
        assert_stats(report["in_process_us"][case], config["iterations"])
        assert_stats(report["nats_round_trip_ms"][case], config["nats_requests"])
        assert case in stdout
    assert_stats(report["nats_floor_ms"], config["nats_requests"])
    cases = report["in_process_us"]
    # What each case is made of, as the benchmark describes it.
    assert (cases["all_hold_all"]["num_workers_matched"], cases["all_hold_all"]["num_distinct_answers"]) == (100, 1)
    assert cases["shared_prefix"]["num_workers_matched"] == 100 and cases["shared_prefix"]["num_distinct_answers"] > 1
    assert cases["distinct_prefixes"]["num_distinct_answers"] == 100
    assert cases["miss"]["num_workers_matched"] == 0
    assert_stats(report["prompt_hashing_ms"], report["prompt_hashing_ms"]["n"])
    codec = report["codec_us"]
    assert codec["lookup_bytes"] > 1024 * 8 and codec["reply_bytes"] > 0
    for step in ("encode_lookup", "decode_lookup", "encode_reply", "decode_reply"):
        assert_stats(codec[step], codec[step]["n"])
    assert "p50" in stdout and "agree" in stdout


def test_no_process_is_left_behind(quick_run):
    report, _ = quick_run
    pids = [pid for pid in report["processes"].values() if pid]
    assert len(pids) == 2
    assert not [pid for pid in pids if alive(pid)], f"left running: {pids}"
    assert os.getpid() not in pids
