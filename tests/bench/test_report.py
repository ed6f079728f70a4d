"""pdserve bench without a server: statistics, TPOT/ITL, goodput, timeline, and the synthetic workload."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from pdserve.bench import BenchConfig, BenchConfigError, summary_table
from pdserve.bench.cli import add_arguments, config_from_args
from pdserve.bench.client import RequestResult
from pdserve.bench.report import build_result, meets_slo, stats, timeline
from pdserve.bench.runner import arrival_times
from pdserve.bench.workload import WORDS, build_workload, length_bounds, rng_for, sample_lengths
from pdserve.models import default_cache_dir
from pdserve.tokenizer import ByteTokenizer

SMOLLM2 = default_cache_dir() / "SmolLM2-135M-Instruct"


def make_result(index: int = 0, *, ttft_s: float = 0.1, gaps_s: tuple[float, ...] = (0.01, 0.01, 0.01),
                output_tokens: int | None = None, start_s: float = 0.0, error: str | None = None) -> RequestResult:
    """A finished request: first text at start + ttft, then one text chunk after each gap."""
    times = [start_s + ttft_s]
    for gap in gaps_s:
        times.append(times[-1] + gap)
    r = RequestResult(index=index, prefix_id=None, max_tokens=8, prompt_tokens=10, start_s=start_s,
                      end_s=times[-1] + 0.001, chunk_times_s=times,
                      output_tokens=len(times) if output_tokens is None else output_tokens)
    if error is None:
        r.ok = True
    else:
        r.error, r.chunk_times_s, r.output_tokens = error, [], 0
    return r


# ----------------------------------------------------------------------------------- statistics


def test_stats_match_numpy_percentiles():
    values = list(np.random.default_rng(7).lognormal(3, 1, size=500))
    s = stats(values)
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(values, q))
    assert s["mean"] == pytest.approx(np.mean(values))
    assert (s["min"], s["max"], s["count"]) == (min(values), max(values), 500)


def test_stats_of_nothing_are_null():
    assert stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None, "count": 0}


def test_tpot_and_itl_from_chunk_times():
    r = make_result(ttft_s=0.2, gaps_s=(0.05, 0.03, 0.04), output_tokens=4)
    assert r.ttft_ms == pytest.approx(200)
    assert r.itl_ms == pytest.approx([50, 30, 40])
    assert r.e2e_ms == pytest.approx(321)
    assert r.tpot_ms == pytest.approx((321 - 200) / 3)  # (e2e - ttft) / (output_tokens - 1)


def test_tpot_uses_the_token_count_not_the_chunk_count():
    # Two chunks carrying 10 tokens (a server that batches tokens per chunk): TPOT divides by 9, not 1.
    r = make_result(ttft_s=0.1, gaps_s=(0.09,), output_tokens=10)
    assert r.tpot_ms == pytest.approx((r.e2e_ms - 100) / 9)


def test_one_token_and_failed_requests_have_no_tpot():
    assert make_result(gaps_s=(), output_tokens=1).tpot_ms is None
    failed = make_result(error="HTTP 500: boom")
    assert (failed.ttft_ms, failed.tpot_ms, failed.e2e_ms, failed.itl_ms) == (None, None, None, [])


# ----------------------------------------------------------------------------------- goodput


def test_meets_slo_checks_each_given_slo():
    fast = make_result(ttft_s=0.05, gaps_s=(0.01,) * 4)  # TTFT 50 ms, TPOT ~10 ms
    slow_start = make_result(ttft_s=0.5, gaps_s=(0.01,) * 4)
    slow_tokens = make_result(ttft_s=0.05, gaps_s=(0.05,) * 4)
    assert meets_slo(fast, 100, 20) and meets_slo(fast, None, None)
    assert not meets_slo(slow_start, 100, None) and meets_slo(slow_start, None, 20)
    assert not meets_slo(slow_tokens, None, 20) and meets_slo(slow_tokens, 100, None)
    assert not meets_slo(make_result(error="x"), None, None)
    assert meets_slo(make_result(ttft_s=0.05, gaps_s=(), output_tokens=1), 100, 1)  # no TPOT to miss


def test_goodput_counts_requests_within_slos():
    results = [make_result(0, ttft_s=0.05), make_result(1, ttft_s=0.05), make_result(2, ttft_s=0.3),
               make_result(3, ttft_s=0.05, gaps_s=(0.1, 0.1)), make_result(4, error="HTTP 503: busy")]
    config = BenchConfig(num_requests=5, slo_ttft_ms=100, slo_tpot_ms=50)
    result = build_result(config, "m", "2024-01-01T00:00:00+00:00", 2.0, results)
    assert result["goodput"] == {"requests_per_s": 1.0, "fraction": 0.4, "slo_ttft_ms": 100, "slo_tpot_ms": 50}
    assert result["throughput"]["requests_per_s"] == 2.0
    assert (result["num_ok"], result["num_failed"], result["errors"]) == (4, 1, {"HTTP 503: busy": 1})


def test_goodput_without_slos_is_completed_throughput():
    results = [make_result(i, ttft_s=0.1 * i) for i in range(4)] + [make_result(4, error="timeout")]
    result = build_result(BenchConfig(num_requests=5), "m", "t", 4.0, results)
    assert result["goodput"]["requests_per_s"] == result["throughput"]["requests_per_s"] == 1.0
    assert result["goodput"]["fraction"] == 0.8


def test_result_metrics_throughput_and_timeline():
    results = [make_result(0, start_s=0.0, ttft_s=0.5, gaps_s=(0.3, 0.3), output_tokens=7),  # chunks 0.5 0.8 1.1
               make_result(1, start_s=1.5, ttft_s=0.2, gaps_s=(0.1,), output_tokens=2),  # chunks 1.7 1.8
               make_result(2, error="HTTP 500: x")]
    result = build_result(BenchConfig(num_requests=3), "m", "t", 2.5, results)
    assert result["metrics"]["ttft_ms"]["count"] == 2
    assert result["metrics"]["itl_ms"]["count"] == 3
    assert result["metrics"]["itl_ms"]["mean"] == pytest.approx((300 + 300 + 100) / 3)
    assert result["throughput"]["output_tokens_per_s"] == pytest.approx(9 / 2.5)
    assert result["throughput"]["total_tokens_per_s"] == pytest.approx((9 + 20) / 2.5)
    # 7 tokens over 3 chunks: 3, 2, 2 -> second 0 gets 5, second 1 gets 2 + 2 from request 1
    assert result["timeline"] == [{"t_s": 0, "output_tokens": 5, "requests_done": 0},
                                  {"t_s": 1, "output_tokens": 4, "requests_done": 2},
                                  {"t_s": 2, "output_tokens": 0, "requests_done": 0}]
    assert [r["index"] for r in result["requests"]] == [0, 1, 2]
    assert result["requests"][2]["error"] == "HTTP 500: x" and result["requests"][2]["ttft_ms"] is None
    table = summary_table(result)
    assert "2 ok, 1 failed of 3" in table and "HTTP 500: x" in table


def test_timeline_covers_the_whole_run_and_sums_to_the_output_tokens():
    results = [make_result(i, start_s=0.37 * i, gaps_s=(0.2,) * 5, output_tokens=13) for i in range(10)]
    bins = timeline(results, duration_s=max(r.end_s for r in results))
    assert [b["t_s"] for b in bins] == list(range(len(bins)))
    assert sum(b["output_tokens"] for b in bins) == 130
    assert sum(b["requests_done"] for b in bins) == 10


def test_the_api_key_is_redacted_in_the_result():
    config = BenchConfig(api_key="sk-secret")
    assert config.as_dict()["api_key"] == "<redacted>"
    assert "sk-secret" not in str(build_result(config, "m", "t", 1.0, [make_result()]))


@pytest.mark.parametrize("options", [
    {"num_requests": 0}, {"concurrency": 0}, {"rate": 0.0}, {"input_len": 0}, {"output_len_dist": "zipf"},
    {"input_len_spread": 1.5, "input_len_dist": "uniform"}, {"shared_prefix_fraction": 1.2}, {"num_prefixes": 0},
    {"endpoint": "127.0.0.1:8000"}, {"slo_ttft_ms": -1.0}, {"api": "embeddings"},
])
def test_config_rejects_values_that_cannot_work(options):
    with pytest.raises(BenchConfigError, match=next(iter(options))):
        BenchConfig(**options)


def test_endpoint_with_or_without_v1():
    assert BenchConfig(endpoint="http://h:1/v1/").base_url == "http://h:1"
    assert BenchConfig(endpoint="http://h:1").base_url == "http://h:1"


def test_cli_flags_cover_every_option_with_its_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == BenchConfig()
    args = parser.parse_args(["--rate", "2.5", "--input-len-dist", "lognormal", "--slo-tpot-ms", "40", "--ignore-eos"])
    config = config_from_args(args)
    assert (config.rate, config.input_len_dist, config.slo_tpot_ms, config.ignore_eos) == (2.5, "lognormal", 40, True)


# ----------------------------------------------------------------------------------- workload


def test_workload_is_deterministic_from_the_seed():
    config = BenchConfig(num_requests=30, input_len=40, input_len_dist="normal", output_len_dist="lognormal",
                         shared_prefix_fraction=0.3, num_prefixes=4, seed=5)
    assert build_workload(config) == build_workload(config)
    other = build_workload(BenchConfig(**{**config.__dict__, "seed": 6}))
    assert [w.prompt for w in other] != [w.prompt for w in build_workload(config)]
    # Request i does not depend on how many requests the run has.
    longer = build_workload(BenchConfig(**{**config.__dict__, "num_requests": 60}))
    assert longer[:30] == build_workload(config)


def test_word_prompts_have_input_len_words_from_the_vocabulary():
    items = build_workload(BenchConfig(num_requests=20, input_len=50, input_len_dist="uniform", input_len_spread=0.5))
    for item in items:
        words = item.prompt.split()
        assert len(words) == item.num_prompt_tokens and set(words) <= set(WORDS)
        assert 25 <= item.num_prompt_tokens <= 75


@pytest.mark.parametrize("fraction, num_prefixes", [(0.25, 1), (0.5, 8), (0.9, 3)])
def test_shared_prefixes_respect_the_fraction_and_their_number(fraction, num_prefixes):
    items = build_workload(BenchConfig(num_requests=200, input_len=100, shared_prefix_fraction=fraction,
                                       num_prefixes=num_prefixes, seed=1))
    assert {item.prefix_id for item in items} == set(range(num_prefixes))
    by_prefix: dict[int, set[str]] = {}
    for item in items:
        assert len(item.prefix_text.split()) == round(fraction * 100)
        assert item.prompt.split()[: round(fraction * 100)] == item.prefix_text.split()
        by_prefix.setdefault(item.prefix_id, set()).add(item.prefix_text)
    assert all(len(texts) == 1 for texts in by_prefix.values())  # one prefix text per prefix id
    assert len({next(iter(texts)) for texts in by_prefix.values()}) == num_prefixes  # and they differ
    assert len({item.suffix_text for item in items}) == len(items)  # every user's own part differs


def test_shared_prefix_of_varying_lengths_is_a_common_prefix():
    items = build_workload(BenchConfig(num_requests=50, input_len=80, input_len_dist="uniform", input_len_spread=0.5,
                                       shared_prefix_fraction=0.5, num_prefixes=2))
    for item in items:
        assert len(item.prefix_text.split()) == round(0.5 * item.num_prompt_tokens)
    for k in (0, 1):
        prefixes = sorted((i.prefix_text for i in items if i.prefix_id == k), key=len)
        assert all(p.startswith(prefixes[0]) for p in prefixes)


def test_no_shared_prefix_by_default_and_chat_messages():
    items = build_workload(BenchConfig(num_requests=5, input_len=10))
    assert all(item.prefix_id is None and item.prefix_text == "" for item in items)
    assert items[0].messages() == [{"role": "user", "content": items[0].prompt}]
    shared = build_workload(BenchConfig(num_requests=2, input_len=10, shared_prefix_fraction=0.5))[0]
    assert shared.messages() == [{"role": "system", "content": shared.prefix_text},
                                 {"role": "user", "content": shared.suffix_text.strip()}]


@pytest.mark.parametrize("dist", ["fixed", "uniform", "normal", "lognormal"])
@pytest.mark.parametrize("mean, spread", [(1, 0.5), (200, 0.25), (1000, 1.0)])
def test_lengths_stay_in_bounds_around_the_mean(dist, mean, spread):
    lengths = sample_lengths(rng_for(3, 0), 4000, mean, dist, spread)
    low, high = length_bounds(mean, dist, spread)
    assert 1 <= low <= min(lengths) and max(lengths) <= high
    assert all(isinstance(n, int) for n in lengths)
    if dist == "fixed":
        assert set(lengths) == {mean}
    elif mean >= 200:
        # Truncation and rounding move the mean a little; a wrong parametrisation moves it a lot.
        assert np.mean(lengths) == pytest.approx(mean, rel=0.06)
        if dist == "normal" and spread > 1 / 3:
            return  # truncated at 1 below (and as far above): the spread is necessarily smaller
        assert np.std(lengths) == pytest.approx(spread * mean / (3**0.5 if dist == "uniform" else 1), rel=0.2)


def test_prompts_of_exact_token_counts_with_a_tokenizer():
    tokenizer = ByteTokenizer()  # one token per byte: a tokenizer that never cuts at word boundaries
    config = BenchConfig(num_requests=40, input_len=97, input_len_dist="lognormal", shared_prefix_fraction=0.4,
                         num_prefixes=3, tokenizer="byte")
    items = build_workload(config, tokenizer)
    lengths = sample_lengths(rng_for(0, 0), 40, 97, "lognormal", 0.25)
    assert [len(tokenizer.encode(i.prompt)) for i in items] == [i.num_prompt_tokens for i in items] == lengths
    assert all(len(tokenizer.encode(i.prefix_text)) == round(0.4 * n) for i, n in zip(items, lengths))


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(),
                    reason="the default model's tokenizer is not pulled (pdserve model pull)")
def test_prompts_of_exact_token_counts_with_a_hugging_face_tokenizer():
    from pdserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(SMOLLM2))
    items = build_workload(BenchConfig(num_requests=30, input_len=120, input_len_dist="normal",
                                       shared_prefix_fraction=0.5, num_prefixes=2), tokenizer)
    lengths = sample_lengths(rng_for(0, 0), 30, 120, "normal", 0.25)
    assert [len(tokenizer.encode(i.prompt)) for i in items] == lengths
    for item in items:  # the shared part is a token prefix, which is what a prefix cache reuses
        prefix_ids = tokenizer.encode(item.prefix_text)
        assert tokenizer.encode(item.prompt)[: len(prefix_ids)] == prefix_ids


def test_poisson_arrivals_are_deterministic_with_the_asked_rate():
    times = arrival_times(seed=2, num_requests=5000, rate=50.0)
    assert times == arrival_times(seed=2, num_requests=5000, rate=50.0)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.05)


def test_handoff_is_the_second_chunks_gap_over_the_later_gaps_median():
    from pdserve.bench.report import handoff

    results = [make_result(0, gaps_s=(0.09, 0.03, 0.03, 0.06)),  # 90 ms over a median of 30: 3.0
               make_result(1, gaps_s=(0.02, 0.02, 0.02)),  # no hand-off cost: 1.0
               make_result(2, gaps_s=(0.05,))]  # one gap only: nothing to compare with, left out
    out = handoff(results)
    assert out["second_chunk_gap_ms"]["count"] == out["gap_over_later_itl_median"]["count"] == 2
    assert out["second_chunk_gap_ms"]["max"] == pytest.approx(90)
    assert out["gap_over_later_itl_median"]["max"] == pytest.approx(3.0)
    assert out["gap_over_later_itl_median"]["min"] == pytest.approx(1.0)
    result = build_result(BenchConfig(endpoint="http://x", num_requests=3), "m", "now", 1.0, results)
    assert result["handoff"] == out
    assert "hand-off: 2nd chunk's gap p50" in summary_table(result)
