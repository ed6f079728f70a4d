"""BenchConfig: every option of one `pdserve bench` run, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

LENGTH_DISTS = ("fixed", "uniform", "normal", "lognormal")
APIS = ("completions", "chat")


class BenchConfigError(ValueError):
    """An option value that cannot work; the message names the option and what to change."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run against an OpenAI-compatible endpoint.

    Scheduling: with `rate` unset, a closed loop keeps `concurrency` requests in flight (1 when unset);
    with `rate` set, requests arrive as a Poisson process at `rate` per second whatever the server does
    (open loop), and `concurrency`, when set, caps how many are in flight at once.

    Lengths: `input_len` / `output_len` are means; `*_spread` is the relative spread (uniform: half-width
    over mean; normal and lognormal: standard deviation over mean). Without `tokenizer`, an input token is
    one common English word; with it (a local Hugging Face directory, or "byte" for pdserve's mock engine)
    prompts have exactly `input_len` tokens before any chat template or special tokens.
    """

    endpoint: str = "http://127.0.0.1:8000"
    api: Literal["completions", "chat"] = "completions"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    num_requests: int = 100
    concurrency: int | None = None
    rate: float | None = None
    seed: int = 0
    input_len: int = 256
    input_len_dist: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    input_len_spread: float = 0.25
    output_len: int = 128
    output_len_dist: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    output_len_spread: float = 0.25
    shared_prefix_fraction: float = 0.0
    num_prefixes: int = 1
    tokenizer: str | None = None
    ignore_eos: bool = False
    timeout_s: float = 300.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise BenchConfigError(f"endpoint {self.endpoint!r} must be an http:// or https:// base URL")
        _check(self.api in APIS, "api", self.api, f"one of {', '.join(APIS)}")
        _check(self.num_requests >= 1, "num_requests", self.num_requests, "at least 1")
        _check(self.concurrency is None or self.concurrency >= 1, "concurrency", self.concurrency, "at least 1")
        _check(self.rate is None or self.rate > 0, "rate", self.rate, "above 0 requests per second")
        for name in ("input_len", "output_len"):
            value, dist, spread = getattr(self, name), getattr(self, f"{name}_dist"), getattr(self, f"{name}_spread")
            _check(value >= 1, name, value, "at least 1")
            _check(dist in LENGTH_DISTS, f"{name}_dist", dist, f"one of {', '.join(LENGTH_DISTS)}")
            _check(spread >= 0, f"{name}_spread", spread, "0 or more")
            # A uniform spread past 1 would reach lengths of 0 or below.
            _check(dist != "uniform" or spread <= 1, f"{name}_spread", spread,
                   "at most 1 with the uniform distribution")
        _check(0 <= self.shared_prefix_fraction <= 1, "shared_prefix_fraction", self.shared_prefix_fraction,
               "between 0 and 1")
        _check(self.num_prefixes >= 1, "num_prefixes", self.num_prefixes, "at least 1")
        _check(self.timeout_s > 0, "timeout_s", self.timeout_s, "above 0 seconds")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, value, "above 0 milliseconds")

    @property
    def base_url(self) -> str:
        """The endpoint without a trailing slash or /v1, so both spellings users paste work."""
        url = self.endpoint.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def as_dict(self) -> dict[str, Any]:
        """All options, for the result's "config"; the API key is redacted so results can be shared."""
        options = dataclasses.asdict(self)
        if options["api_key"] is not None:
            options["api_key"] = "<redacted>"
        return options


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise BenchConfigError(f"{name}={value!r}: must be {expected} (--{name.replace('_', '-')})")
