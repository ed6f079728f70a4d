"""Smoke test of benchmarks/transfer.py: a --quick run (run as a script, as benchmarks/ is not a package)
writes JSON that is complete and agrees with itself. No timing thresholds: benchmarks never gate CI on a
timing."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.kv import nixl_path

from tests.benchmarks.reports import strict_json

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240



def mooncake_engine_imports() -> bool:
    """`import mooncake` alone succeeds without the engine's shared libraries: probe mooncake.engine, in a
    process with the benchmark's environment, after the same preload of the libraries `make` fetched."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import mooncake_tcp; mooncake_tcp.preload_fetched_libs(); import mooncake.engine"
    probe = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("transfer_bench") / "tmp.json"
    proc = subprocess.run([sys.executable, "benchmarks/transfer.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return strict_json(out.read_text()), proc.stdout


def available(report: dict) -> list[tuple[str, str, dict]]:
    return [(layout, name, v) for layout, entry in report["layouts"].items()
            for name, v in entry["variants"].items() if v["available"]]


def test_run_describes_machine_and_command(quick_run):
    report, _ = quick_run
    assert report["machine"]["cpu_count"] >= 1
    assert report["machine"]["platform"]
    assert datetime.datetime.fromisoformat(report["date"]).tzinfo is not None
    assert "benchmarks/transfer.py" in report["command"] and "--quick" in report["command"]
    assert report["mooncake"]["protocol"] == "tcp"


def test_every_layout_has_raw_pdserve_and_mooncake(quick_run):
    report, stdout = quick_run
    layouts = report["settings"]["layouts"]
    assert layouts and sorted(report["layouts"]) == sorted(layouts)
    pdserve = {"pdserve" if b == 0 else f"pdserve/batch={b}" for b in report["settings"]["batch_blocks"]}
    pdserve |= {"pdserve/stream", "pdserve/frames"}  # the tcp path's two ways, side by side
    nixl = {"nixl", "nixl/landing", "nixl/raw"} if nixl_path.why_unavailable() is None else set()
    for layout, entry in report["layouts"].items():
        assert set(entry["variants"]) == pdserve | nixl | {"shm", "memcpy", "raw", "mooncake"}, layout
        assert entry["payload_bytes"] == entry["num_blocks"] * entry["block_nbytes"] > 0
        for name in pdserve | nixl | {"shm", "memcpy", "raw"}:
            assert entry["variants"][name]["available"], (layout, name)
        for name in entry["variants"]:
            assert any(line.startswith(layout) and f" {name} " in line for line in stdout.splitlines()), \
                (layout, name, stdout)


def test_mooncake_runs_where_its_engine_imports(quick_run):
    report, _ = quick_run
    engine_imports = mooncake_engine_imports()
    for layout, entry in report["layouts"].items():
        mooncake = entry["variants"]["mooncake"]
        if engine_imports:
            assert mooncake["available"], (layout, mooncake.get("reason"))
            assert set(entry["pdserve_over_mooncake"]) == {n for n in entry["variants"]
                                                           if n.split("/")[0] in ("pdserve", "shm")}
        else:
            assert not mooncake["available"] and mooncake["reason"], layout
            assert entry["pdserve_over_mooncake"] is None


def test_figures_are_positive_and_ordered(quick_run):
    report, _ = quick_run
    for layout, name, v in available(report):
        assert v["num_samples"] == report["settings"]["reps"], (layout, name)
        assert 0 < v["median_gbps"] <= v["best_gbps"], (layout, name)
        assert 0 < v["p10_gbps"] <= v["p90_gbps"] <= v["best_gbps"], (layout, name)
        assert v["cpu_ms_per_gb"] > 0 and v["cpu_recv_ms_per_gb"] >= 0 and v["cpu_send_ms_per_gb"] >= 0


def test_ratios_agree_with_the_figures(quick_run):
    report, _ = quick_run
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9)  # noqa: E731
    for layout, entry in report["layouts"].items():
        variants = entry["variants"]
        raw, mooncake = variants["raw"], variants["mooncake"]
        assert raw["ratio_median_to_raw"] == 1.0 and raw["ratio_best_to_raw"] == 1.0
        for name, v in variants.items():
            if not v["available"]:
                continue
            assert close(v["ratio_median_to_raw"], v["median_gbps"] / raw["median_gbps"]), (layout, name)
            assert close(v["ratio_median_to_memcpy"], v["median_gbps"] / variants["memcpy"]["median_gbps"])
            assert close(v["ratio_best_to_raw"], v["best_gbps"] / raw["best_gbps"]), (layout, name)
            assert close(v["cpu_ratio_to_raw"], v["cpu_ms_per_gb"] / raw["cpu_ms_per_gb"]), (layout, name)
            if mooncake["available"]:
                assert close(v["ratio_median_to_mooncake"], v["median_gbps"] / mooncake["median_gbps"])
                assert close(v["cpu_ratio_to_mooncake"], v["cpu_ms_per_gb"] / mooncake["cpu_ms_per_gb"])
            else:
                assert v["ratio_median_to_mooncake"] is None
        for name, ratios in (entry["pdserve_over_mooncake"] or {}).items():
            assert close(ratios["median_gbps"], variants[name]["median_gbps"] / mooncake["median_gbps"])
            assert close(ratios["cpu_per_gb"], variants[name]["cpu_ms_per_gb"] / mooncake["cpu_ms_per_gb"])


def test_it_ends_with_one_ratio_line_per_path(quick_run):
    report, stdout = quick_run
    lines = [line.split() for line in stdout.splitlines() if line.startswith("ratio ")]
    nixl = nixl_path.why_unavailable() is None
    assert [line[1] for line in lines] == ["tcp/raw_socket", "shm/memcpy", *(["nixl/tcp", "nixl/nixl_raw", "nixl/nixl_landing"] if nixl else [])]
    first = report["layouts"][report["ratios"]["layout"]]["variants"]
    assert float(lines[0][2]) == round(first["pdserve"]["ratio_median_to_raw"], 2)
    assert float(lines[1][2]) == round(first["shm"]["ratio_median_to_memcpy"], 2)
    assert report["ratios"]["shm/memcpy"] == first["shm"]["ratio_median_to_memcpy"]
    if nixl:
        assert float(lines[2][2]) == round(first["nixl"]["median_gbps"] / first["pdserve"]["median_gbps"], 2)
        assert float(lines[3][2]) == round(first["nixl"]["median_gbps"] / first["nixl/raw"]["median_gbps"], 2)
        assert float(lines[4][2]) == round(first["nixl"]["median_gbps"] / first["nixl/landing"]["median_gbps"], 2)
