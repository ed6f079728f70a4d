"""Prometheus metrics: names follow Prometheus conventions (`pdserve_` prefix, base units, `_total`).

The router records per-request latencies as requests stream (RouterMetrics). A worker's counters already
live in its engine (engine.stats(), the same numbers WorkerStats reports), so a collector reads them at
scrape time instead of keeping a second copy (WorkerCollector); only per-transfer durations are recorded
as they happen. Each process has its own registry, served on the router's /metrics and on a port-0 HTTP
server per worker that the worker advertises in its heartbeats.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.kv.wire import PATHS

# Latency buckets in seconds: from sub-millisecond control-plane hops to minutes-long CPU generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# A routing decision: tens of microseconds in the policy, a NATS round trip to the broker.
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("pdserve_requests", "Requests by how they ended", ["outcome"], registry=registry)
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=registry)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds", "Mean time per output token after the first, per request",
                              buckets=_TOKEN_BUCKETS, registry=registry)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Time between two streamed chunks",
                             buckets=_TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Whole request, first byte in to last token out",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.retries = Counter("pdserve_worker_retries", "Requests moved to another worker after a failure", ["role"],
                               registry=registry)
        self.local_prefills = Counter("pdserve_local_prefills", "Requests whose decode worker prefilled itself",
                                      registry=registry)
        self.route_decisions = Counter("pdserve_route_decisions", "Routing decisions by reason (cache_hit, "
                                       "local_prefill, prefill_queues_full, no_prefill_worker, prefill_unreachable, "
                                       "prefix_hit, load)", ["reason"], registry=registry)
        self.route_seconds = Histogram("pdserve_route_decision_seconds", "Time to choose a request's workers, the "
                                       "KV broker's lookup included", buckets=_DECISION_BUCKETS, registry=registry)
        self.kv_lookup_seconds = Histogram("pdserve_kv_lookup_seconds", "The KV broker's lookup, as the router waits "
                                           "for it (request to answer)", buckets=_DECISION_BUCKETS, registry=registry)
        self.resumes = Counter("pdserve_decode_resumes", "Streams continued on another decode worker after tokens "
                               "were streamed (it prefilled prompt + those tokens)", registry=registry)
        # Their ratio is the prefix-cache hit rate of the prefills this router sent.
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens sent to prefill workers", registry=registry)
        self.cached_prompt_tokens = Counter("pdserve_prompt_cached_tokens",
                                            "Prompt tokens prefill found in its prefix cache", registry=registry)
        self.http_responses = Counter("pdserve_http_responses", "HTTP responses by status code", ["code"],
                                      registry=registry)


class RequestTimer:
    """Feeds one request's deltas into RouterMetrics: TTFT, inter-token gaps, TPOT and end to end."""

    def __init__(self, metrics: RouterMetrics):
        self._m = metrics
        self._start = self._last = time.perf_counter()
        self._first: float | None = None
        self._num_tokens = 0

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._m.ttft.observe(now - self._start)
        else:
            self._m.itl.observe(now - self._last)
        self._last = now
        self._num_tokens += num_tokens

    def finish(self, outcome: str) -> None:
        now = time.perf_counter()
        self._m.requests.labels(outcome=outcome).inc()
        self._m.e2e.observe(now - self._start)
        if self._first is not None and self._num_tokens > 1:
            self._m.tpot.observe((self._last - self._first) / (self._num_tokens - 1))


class WorkerCollector(Collector):
    """Reads a worker's counters at scrape time; `stats()` returns the WorkerStats field names."""

    _COUNTERS = {  # stats key -> (metric, help, (label, value) or None)
        "num_requests_served": ("pdserve_worker_requests_served", "Requests this worker finished", None),
        "num_kv_blocks_sent": ("pdserve_kv_transfer_blocks", "KV blocks moved", ("direction", "sent")),
        "num_kv_blocks_received": ("pdserve_kv_transfer_blocks", "KV blocks moved", ("direction", "received")),
        "num_kv_bytes_sent": ("pdserve_kv_transfer_bytes", "KV bytes moved", ("direction", "sent")),
        "num_kv_bytes_received": ("pdserve_kv_transfer_bytes", "KV bytes moved", ("direction", "received")),
        **{f"num_kv_pulls_{path}": ("pdserve_kv_pulls", "KV pulls this worker made, by the path the bytes took",
                                    ("transport", path)) for path in PATHS},
        "num_kv_transport_fallbacks": ("pdserve_kv_transport_fallbacks", "Pulls that could not take the same-host "
                                       "path they were meant to and went over TCP (the log says why)", None),
        "num_recomputes": ("pdserve_kv_recomputes", "Prefills recomputed locally after a failed KV load", None),
        "num_transfers_refused": ("pdserve_kv_transfers_refused", "KV pulls refused (token, released, unknown)", None),
        "num_local_prefills": ("pdserve_worker_local_prefills", "Requests this decode worker prefilled itself", None),
        "num_cached_tokens": ("pdserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", None),
        "num_prefix_peer_loaded_tokens": ("pdserve_prefix_peer_loaded_tokens", "Prompt tokens whose KV was pulled "
                                          "from another worker's prefix cache instead of computed", None),
        "num_prefix_peer_loaded_bytes": ("pdserve_prefix_peer_loaded_bytes", "KV bytes pulled from other workers' "
                                         "prefix caches instead of computed", None),
        "num_prefix_peer_load_failures": ("pdserve_prefix_peer_load_failures", "Prefix pulls from a peer that "
                                          "failed (the tokens were computed)", None),
        "num_prefix_host_loaded_tokens": ("pdserve_prefix_host_loaded_tokens", "Prompt tokens whose KV was copied "
                                          "back from this worker's host-memory tier instead of computed", None),
        "num_computed_prompt_tokens": ("pdserve_prompt_tokens_computed", "Prompt tokens this worker's engine "
                                       "computed (prefills, local prefills, recomputes)", None),
    }
    _GAUGES = {
        "num_queued": ("pdserve_worker_queue_depth", "Requests admitted and waiting"),
        "num_running": ("pdserve_worker_running_requests", "Requests running in the engine"),
        "kv_usage": ("pdserve_kv_cache_usage_ratio", "Share of the KV cache in use (0..1)"),
        "num_held_blocks": ("pdserve_kv_held_blocks", "KV blocks held (running requests and transfers)"),
        "num_host_tier_blocks": ("pdserve_kv_host_tier_blocks", "KV blocks in this worker's host-memory tier"),
    }

    def __init__(self, stats: Callable[[], dict], labels: dict[str, str]):
        self._stats = stats
        self._labels = labels

    def collect(self) -> Iterable:
        stats = self._stats()
        names, values = list(self._labels), list(self._labels.values())
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, doc, label) in self._COUNTERS.items():
            if key not in stats:
                continue
            family = families.get(name) or families.setdefault(
                name, CounterMetricFamily(name, doc, labels=names + ([label[0]] if label else [])))
            family.add_metric(values + ([label[1]] if label else []), float(stats[key]))
        yield from families.values()
        for key, (name, doc) in self._GAUGES.items():
            if key in stats:
                gauge = GaugeMetricFamily(name, doc, labels=names)
                gauge.add_metric(values, float(stats[key]))
                yield gauge


class WorkerMetrics:
    """A worker's registry: its engine's counters plus per-transfer durations; serve() exposes them."""

    def __init__(self, stats: Callable[[], dict], labels: dict[str, str]):
        self.registry = CollectorRegistry()
        self.registry.register(WorkerCollector(stats, labels))
        self.kv_transfer_seconds = Histogram("pdserve_kv_transfer_duration_seconds", "One request's KV pull",
                                             ["transport"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._server = None

    def serve(self, host: str) -> int:
        """Serve /metrics on a free port of host (port 0: never a fixed port); returns the port."""
        self._server, _ = start_http_server(0, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
