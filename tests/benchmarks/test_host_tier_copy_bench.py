"""Smoke test of benchmarks/host_tier_copy.py: a --quick run (as a script: benchmarks/ is not a package) checks the
bytes it copied back and writes JSON with every copy's figures and ratios. No timing thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.benchmarks.reports import strict_json

REPO = Path(__file__).resolve().parents[2]


def test_a_quick_run_reports_every_copy_against_memcpy(tmp_path):
    out = tmp_path / "host_tier_copy.json"
    proc = subprocess.run([sys.executable, "benchmarks/host_tier_copy.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = strict_json(out.read_text())
    assert report["num_blocks"] == 4 and report["block_nbytes"] == 30 * 3 * 32 * 2 * 64 * 4
    assert set(report["ratios"]) == {"save_first/memcpy", "save/memcpy", "load/memcpy"}
    assert all(ratio > 0 for ratio in report["ratios"].values())
    assert all(len(s) == 2 for s in report["seconds"].values())
    assert "ratio load/memcpy" in proc.stdout
