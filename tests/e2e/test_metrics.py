"""Prometheus /metrics on the router and on every worker parse as Prometheus text and move with traffic."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import MOCK_MODEL
from tests.e2e.conftest import get_json

pytestmark = pytest.mark.e2e


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, str(x)) in ls for k, x in labels.items()))


def test_router_and_worker_metrics_move_with_traffic(system_2p2d):
    base = system_2p2d.base_url
    _, health = get_json(f"{base}/health")
    worker_urls = {w["worker_id"]: (w["role"], w["metrics_address"]) for w in health["workers"]}
    assert all(url and url.startswith("http://") for _, url in worker_urls.values())
    router_before = scrape(f"{base}/metrics")
    workers_before = {wid: scrape(url) for wid, (_, url) in worker_urls.items()}

    for i in range(6):
        r = httpx.post(f"{base}/v1/completions", timeout=30,
                       json={"model": MOCK_MODEL, "prompt": f"metrics {i} " * 20, "max_tokens": 8, "stream": i % 2 == 0})
        assert r.status_code == 200
    assert httpx.post(f"{base}/v1/completions", json={"model": MOCK_MODEL}, timeout=10).status_code == 400
    time.sleep(0.2)

    router = scrape(f"{base}/metrics")
    grew = lambda name, **labels: value(router, name, **labels) - value(router_before, name, **labels)  # noqa: E731
    assert grew("pdserve_requests_total", outcome="ok") == 6
    assert grew("pdserve_time_to_first_token_seconds_count") == 6
    assert grew("pdserve_e2e_request_latency_seconds_count") == 6
    assert grew("pdserve_time_per_output_token_seconds_count") == 6
    assert grew("pdserve_inter_token_latency_seconds_count") > 0
    assert grew("pdserve_http_responses_total", code="400") == 1
    assert grew("pdserve_prompt_tokens_total") > 6 * 20  # six prompts of 20+ tokens went through prefill
    assert grew("pdserve_prompt_cached_tokens_total") == 0  # six prompts that differ in their first block: no hit

    sent = received = served = 0.0
    for wid, (role, url) in worker_urls.items():
        after, before = scrape(url), workers_before[wid]
        assert value(after, "pdserve_kv_held_blocks", worker_id=wid) >= 0
        served += value(after, "pdserve_worker_requests_served_total") - value(before, "pdserve_worker_requests_served_total")
        if role == "prefill":
            sent += value(after, "pdserve_kv_transfer_bytes_total", direction="sent") - value(before, "pdserve_kv_transfer_bytes_total", direction="sent")
        else:
            received += value(after, "pdserve_kv_transfer_bytes_total", direction="received") - value(before, "pdserve_kv_transfer_bytes_total", direction="received")
            assert value(after, "pdserve_kv_transfer_duration_seconds_count") >= value(before, "pdserve_kv_transfer_duration_seconds_count")
    assert served == 12  # each request once on a prefill and once on a decode worker
    assert sent == received > 0
