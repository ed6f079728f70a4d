"""The worker-facing engine interface: the mock engine implements it now, vLLM implements it next.

A prefill worker calls `prefill()` (one token, KV kept and served under a lease) and later `release_kv()`;
a decode worker calls `generate()` with the KV location from prefill (or none, to prefill locally). The
engine owns its KV memory and its transfer endpoint, because with vLLM the KV lives in the engine's own
process; workers only pass `KVTransferParams` along.

Values flow one way: the engine reports through what it returns and yields (a `KVLoadReport` is an item of
`generate()`'s stream), and raises `EngineFull` when its KV memory cannot take a request; its collaborators
(the KV event sink) are given to its constructor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import AsyncIterator

from pdserve.kv.events import KVEventSink
from pdserve.protocol import FinishReason, KVTransferParams, ModelCard, SamplingParams


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    first_text: str
    finish_reason: FinishReason | None  # set when the first token already ends the request
    kv_transfer_params: KVTransferParams | None  # None when nothing is held (request finished)
    num_cached_tokens: int = 0
    queue_ms: float | None = None  # time waiting for compute, where the engine knows it (the rest is compute)
    num_peer_loaded_tokens: int = 0  # prompt tokens whose KV was pulled from a peer's cache, not computed
    num_peer_loaded_bytes: int = 0  # the bytes of that pull
    peer_load_ms: float = 0.0  # and its time


@dataclass(frozen=True)
class TokenOutput:
    """Tokens generated since the last output; the last one has a finish_reason."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class KVLoadReport:
    """How a decode got its prompt KV: pulled from prefill, or recomputed locally (and why)."""

    num_blocks: int
    num_bytes: int
    transfer_ms: float
    recomputed: bool
    error: str | None = None
    transport: str = ""  # the path the bytes took (tcp, shm); "" when nothing was pulled
    unreachable: bool = False  # no connection to the prefill worker's endpoint could be made (kv.PeerUnreachable)
    num_tokens: int = 0  # vLLM: the prompt tokens the load was to bring (computed by vLLM instead when it failed)
    # READs of the failed pull still landing in its blocks (kv/read_fence.py): vLLM keeps the request waiting until
    # they end, so the engine runs the prompt anew in a new request instead
    reads_in_flight: int = 0


class KVLoadError(Exception):
    """The KV named by kv_transfer_params could not be loaded (refused, timed out, corrupt, mismatched)."""


class EngineFull(Exception):
    """Not enough free KV blocks for the request right now (retry elsewhere)."""


class Engine(abc.ABC):
    """An engine is given at construction its `kv_events` (kv.events.KVEventSink, or None), told of every
    block copy the engine computes, receives, frees or evicts, by pdserve's chained block hash, for the
    broker's index. An engine that moves KV makes the transfer spans: "kv pull" (decode, child of the
    current span) and "kv serve" (prefill, child of the pull's span through the traceparent in the pull)."""

    card: ModelCard
    kv_events: KVEventSink | None

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def transfer_address(self) -> str | None:
        """The engine's KV transfer endpoint (tcp://host:port), advertised in heartbeats."""

    # Whether prefill() takes prefix_kv and lease_prefix() leases.
    reuses_peer_prefixes: bool = False

    @abc.abstractmethod
    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams, lease_s: float,
        prefix_kv: KVTransferParams | None = None,
    ) -> PrefillResult:
        """Run the prompt, choose the first token, keep the KV blocks for a puller until release or lease end.
        prefix_kv: a peer's lease of the prompt's leading blocks, pulled instead of computed where this cache
        lacks them (any failure: computed). Raises EngineFull when the KV memory cannot take the prompt now."""

    async def lease_prefix(self, lease_id: str, block_hashes: tuple[int, ...], lease_s: float,
                           prefix_token_ids: tuple[int, ...] = ()) -> KVTransferParams | None:
        """Hold the leading blocks of block_hashes (prefix_token_ids: their tokens) that this engine's cache has
        for one peer to pull, until release_kv(lease_id) or lease_s; None when none is cached (or the engine does
        not lease). Cancelled (the lease's deadline passed): holds nothing."""
        return None

    @abc.abstractmethod
    async def release_kv(self, request_id: str) -> bool:
        """Free the blocks held for request_id; False if none were held (already released or expired)."""

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingParams,
        first_token_id: int | None,
        kv_transfer_params: KVTransferParams | None,
        resume_token_ids: tuple[int, ...] = (),
        prefix_kv: KVTransferParams | None = None,
    ) -> AsyncIterator[TokenOutput | KVLoadReport]:
        """Load the prompt's KV (pull, or recompute locally on failure) and decode after first_token_id.
        Without KV from prefill (first_token_id None) the prompt is prefilled here; prefix_kv: then a peer's lease
        of its leading blocks, pulled instead of computed where this cache lacks them (as prefill() does).

        When the KV came from kv_transfer_params, one item of the stream is the `KVLoadReport`, yielded the
        moment the KV is pulled or recomputed (normally before any token), so that the worker lets prefill free
        its copy at once; every other item is a `TokenOutput`. Raises EngineFull when the KV memory cannot take
        the request now (before anything is yielded).
        With first_token_id None the engine prefills locally and its first output holds the first token.
        resume_token_ids: tokens an earlier decode worker already generated and streamed (it died); the engine
        prefills prompt + them locally and outputs only what comes after them (no KV, no first token given).
        After the iterator ends or is closed, nothing is held for the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop whatever runs for request_id and free what it holds."""

    async def refresh_stats(self) -> None:
        """Bring stats() up to date where counters live in another process (vLLM's EngineCore)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters named as in protocol.WorkerStats (num_held_blocks, kv_usage, num_kv_bytes_sent, ...)."""


def prefix_lease_id(request_id: str) -> str:
    """The key a worker holds a request's prefix lease under (apart from the request's own KV, should the same
    worker later prefill it)."""
    return f"{request_id}#prefix"
