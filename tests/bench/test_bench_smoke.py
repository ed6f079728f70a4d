"""`pdserve bench` against a real `pdserve up --engine mock`, as a user runs it: the CLI in a subprocess.

The mock engine never stops early (no EOS), so every answer has exactly max_tokens tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.bench import BenchConfig, run_bench
from pdserve.config import MOCK_MODEL

pytestmark = pytest.mark.e2e

STATS_KEYS = {"mean", "p50", "p90", "p99", "min", "max", "count"}
REQUEST_KEYS = {"index", "prefix_id", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "itl_ms",
                "ok", "error"}


def bench(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def check_schema(result: dict, num_requests: int, model: str = MOCK_MODEL) -> None:
    assert set(result) >= {"schema", "endpoint", "model", "api", "config", "started_at", "duration_s",
                           "num_requests", "num_ok", "num_failed", "errors", "metrics", "throughput", "goodput",
                           "timeline", "requests"}
    assert result["schema"] == "pdserve.bench/1" and result["model"] == model
    assert result["num_requests"] == num_requests == len(result["requests"])
    assert set(result["metrics"]) == {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}
    assert all(set(s) == STATS_KEYS for s in result["metrics"].values())
    assert set(result["throughput"]) == {"requests_per_s", "output_tokens_per_s", "total_tokens_per_s"}
    assert set(result["goodput"]) == {"requests_per_s", "fraction", "slo_ttft_ms", "slo_tpot_ms"}
    assert all(set(b) == {"t_s", "output_tokens", "requests_done"} for b in result["timeline"])
    assert all(set(r) >= REQUEST_KEYS for r in result["requests"])


def check_requests(result: dict) -> None:
    """Every request succeeded with exactly its max_tokens, and the timings are consistent."""
    assert (result["num_ok"], result["num_failed"], result["errors"]) == (result["num_requests"], 0, {})
    for r in result["requests"]:
        assert r["ok"] and r["error"] is None
        assert r["output_tokens"] == r["max_tokens"]
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1))
        assert 1 <= len(r["itl_ms"]) <= r["output_tokens"] - 1 and min(r["itl_ms"]) >= 0
    assert result["metrics"]["ttft_ms"]["count"] == result["num_requests"]
    assert sum(b["output_tokens"] for b in result["timeline"]) == sum(r["output_tokens"] for r in result["requests"])
    assert sum(b["requests_done"] for b in result["timeline"]) == result["num_requests"]
    assert result["throughput"]["output_tokens_per_s"] == pytest.approx(
        sum(r["output_tokens"] for r in result["requests"]) / result["duration_s"])


def test_closed_loop_with_shared_prefixes_json_and_plot(system_1p1d, tmp_path):
    out, plot = tmp_path / "result.json", tmp_path / "result.png"
    done = bench("--endpoint", system_1p1d.base_url + "/v1", "--num-requests", "12", "--concurrency", "4",
                 "--input-len", "40", "--output-len", "16", "--shared-prefix-fraction", "0.5", "--num-prefixes", "2",
                 "--ignore-eos", "--slo-ttft-ms", "60000", "--out", str(out), "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    assert "12 ok, 0 failed of 12" in done.stdout and "ttft_ms" in done.stdout
    result = json.loads(out.read_text())
    check_schema(result, 12)
    check_requests(result)
    assert result["config"]["concurrency"] == 4 and result["api"] == "completions"
    assert {r["prefix_id"] for r in result["requests"]} == {0, 1}
    assert all(r["max_tokens"] == 16 for r in result["requests"])
    assert result["goodput"]["fraction"] == 1.0 and result["goodput"]["slo_ttft_ms"] == 60000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_chat_with_exact_prompt_lengths(system_1p1d, tmp_path):
    out = tmp_path / "result.json"
    done = bench("--endpoint", system_1p1d.base_url, "--api", "chat", "--num-requests", "10", "--rate", "20",
                 "--input-len", "30", "--output-len", "12", "--output-len-dist", "uniform",
                 "--output-len-spread", "0.5", "--tokenizer", "byte", "--seed", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    check_schema(result, 10)
    check_requests(result)
    assert result["api"] == "chat" and result["config"]["rate"] == 20
    assert len({r["max_tokens"] for r in result["requests"]}) > 1
    # The router counts the chat template's bytes too: the same for every request, on top of exactly 30.
    assert len({r["prompt_tokens"] for r in result["requests"]}) == 1 and result["requests"][0]["prompt_tokens"] > 30


def test_failed_requests_are_counted_not_fatal(system_1p1d, tmp_path):
    out = tmp_path / "result.json"
    done = bench("--endpoint", system_1p1d.base_url, "--model", "no-such-model", "--num-requests", "4",
                 "--concurrency", "2", "--input-len", "8", "--output-len", "4", "--out", str(out))
    assert done.returncode == 1, done.stderr
    result = json.loads(out.read_text())
    check_schema(result, 4, model="no-such-model")
    assert (result["num_ok"], result["num_failed"]) == (0, 4)
    [(error, count)] = result["errors"].items()
    assert count == 4 and error.startswith("HTTP 404:") and "no-such-model" in error
    assert result["metrics"]["ttft_ms"] == dict.fromkeys(STATS_KEYS - {"count"}, None) | {"count": 0}


async def test_library_api(system_1p1d):
    finished = []
    result = await run_bench(BenchConfig(endpoint=system_1p1d.base_url, num_requests=6, concurrency=3, input_len=20,
                                         output_len=8, slo_tpot_ms=60000), on_request_done=finished.append)
    check_schema(result, 6)
    check_requests(result)
    assert sorted(r.index for r in finished) == list(range(6))
