"""The mock engine: deterministic tokens, a timing model, and real KV-sized payloads over the real transport.

It implements the same Engine interface as the vLLM engine, so the control plane, the transport and the
failure paths are exercised exactly as in production, in milliseconds instead of minutes. Time is simulated
with asyncio sleeps (never a busy loop): `ms_per_prompt_token` per prefilled token, `ms_per_decode_step`
per generated token. Prefill compute is serialised (one prompt at a time, as on a compute-bound GPU);
decodes run concurrently.

With `prefix_caching`, a request's computed full blocks stay in the pool after it ends, as vLLM's prefix
cache keeps them: evictable (least recently used first, a prompt's tail before its head), and reused by a
later local prefill of a prompt with the same leading blocks, which then computes only the rest
(num_cached_tokens). Pulled KV is written into fresh blocks. Every block copy computed, received, freed or
evicted is reported to `kv_events` (given at construction) by chained block hash, for the broker's index.

With a host-memory tier (host_cache_gib, kv.host_tier), an evicted block is copied there first; a prompt whose
leading blocks continue there (after those in the cache) gets them copied back into its fresh blocks, and computes
only the rest, the copies counted as cached tokens (num_prefix_host_loaded_tokens) as vLLM counts tokens that its
KV connector loads.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from pdserve import tracecontext, tracing
from pdserve.engine.base import Engine, EngineFull, KVLoadReport, PrefillResult, TokenOutput
from pdserve.engine.mock_model import TokenStream, fill_prompt_kv
from pdserve.engine.mock_fenced import FencedBlocks
from pdserve.engine.mock_host_tier import HostTierCopies
from pdserve.engine.mock_prefix import PeerPrefixes
from pdserve.kv.events import KVEventSink
from pdserve.kv.hashing import ROOT_HASH, block_hashes
from pdserve.kv.host_tier import GIB, HostKVTier
from pdserve.kv.pool import ArrayBlockPool
from pdserve.kv.read_fence import ReadFence
from pdserve.kv import PeerUnreachable, TransferClient, TransferEndpoint, TransferError, TransferResult
from pdserve.kv.client import DEFAULT_CONNECT_TIMEOUT_S
from pdserve.kv.wire import PATHS
from pdserve.protocol import KVLayout, KVTransferParams, ModelCard, SamplingParams
from pdserve.tracing import SpanKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MockEngineConfig:
    """What a mock engine is made of; engine.factory builds it from WorkerConfig."""

    worker_id: str
    card: ModelCard
    num_kv_blocks: int
    ms_per_prompt_token: float
    ms_per_decode_step: float
    advertise_host: str
    bind_host: str
    kv_pull_timeout_s: float
    kv_connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    kv_transport: str = "auto"
    offer_nixl: bool = False  # factory.offers_nixl
    prefix_caching: bool = True
    host_cache_gib: float = 0.0  # the host-memory tier (0: none)


@dataclass
class _Held:
    block_ids: list[int]
    block_hashes: list[int]  # of the full blocks: block_ids[i] holds block_hashes[i]'s tokens
    num_cached: int = 0  # leading blocks taken from the prefix cache (their KV is already there)
    num_from_host: int = 0  # blocks after those copied back from the host tier into fresh blocks
    computed: bool = False  # the KV of every block is written (computed or pulled)
    transfer_id: str | None = None
    lease_timer: asyncio.TimerHandle | None = None


class MockEngine(PeerPrefixes, HostTierCopies, FencedBlocks, Engine):

    def __init__(self, config: MockEngineConfig, *, kv_events: KVEventSink | None = None):
        self.config = config
        self.worker_id = config.worker_id
        self.card = config.card
        self.kv_events = kv_events
        self._layout = config.card.kv_layout
        self._pool = ArrayBlockPool.zeros(config.num_kv_blocks, self._layout.bytes_per_block,
                                          layout_tag=layout_tag(config.card))
        self._free = list(range(config.num_kv_blocks))
        self._cache: OrderedDict[int, int] = OrderedDict()  # block hash -> block id, least recently used first
        # Cached blocks in use by running requests (block id -> number of them): shared, as vLLM shares a cached
        # prefix between concurrent requests, and never evicted while in use.
        self._pins: Counter[int] = Counter()
        self._held: dict[str, _Held] = {}
        self._fenced: list[tuple[ReadFence, list[int]]] = []  # blocks a failed pull may still write (mock_fenced.py)
        self._host = HostKVTier.sized(config.host_cache_gib, self._layout.bytes_per_block) \
            if config.prefix_caching else None
        self._endpoint = TransferEndpoint(self._pool, bind_host=config.bind_host,
                                          advertise_host=config.advertise_host, on_pull=self._on_pull,
                                          offer_nixl=config.offer_nixl)
        self._client = TransferClient(transport=config.kv_transport, connect_timeout_s=config.kv_connect_timeout_s)
        self._prefill_lock = asyncio.Lock()
        self._running: set[str] = set()
        self._counters = {"num_kv_blocks_received": 0, "num_kv_bytes_received": 0, "kv_transfer_ms": 0.0,
                          "num_recomputes": 0, "num_local_prefills": 0, "num_cached_tokens": 0,
                          "num_prefix_peer_loaded_tokens": 0, "num_prefix_peer_loaded_bytes": 0,
                          "num_prefix_peer_load_failures": 0,
                          "num_prefix_host_loaded_tokens": 0, "num_computed_prompt_tokens": 0,
                          **{f"num_kv_pulls_{path}": 0 for path in PATHS}}

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._endpoint.start()
        if self._host is not None:
            log.info("worker %s: host-memory KV tier of %d blocks (%.2f GiB), empty at start", self.worker_id,
                     self._host.capacity, self._host.capacity * self._host.bytes_per_block / GIB)

    async def stop(self) -> None:
        for request_id in list(self._held):
            self._free_request(request_id)
        self._endpoint.stop()
        self._client.close()

    @property
    def transfer_address(self) -> str | None:
        return self._endpoint.address

    # ------------------------------------------------------------------------------------ prefill

    async def prefill(self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams,
                      lease_s: float, prefix_kv: KVTransferParams | None = None) -> PrefillResult:
        held = self._allocate(request_id, prompt_token_ids, reuse=True)
        num_cached_tokens = self._num_cached_tokens(held, prompt_token_ids)
        num_peer_tokens, peer_load = 0, None
        queued_at = time.monotonic()
        try:
            if prefix_kv is not None:
                peer_load = await self._load_prefix(request_id, prompt_token_ids, held, prefix_kv)
                num_peer_tokens = peer_load[0] if peer_load else 0
            async with self._prefill_lock:
                queue_ms = (time.monotonic() - queued_at) * 1000
                await self._compute(len(prompt_token_ids) - num_cached_tokens - num_peer_tokens)
                self._write_prompt_kv(prompt_token_ids, held.block_ids,
                                      (num_cached_tokens + num_peer_tokens) // self._layout.block_size)
                self._computed(held)
        except BaseException:
            self._free_request(request_id)
            raise
        stream = TokenStream(prompt_token_ids, sampling)
        token, text = stream.next()
        if stream.finish_reason is not None:  # one token was the whole answer: nothing to hand over
            self._free_request(request_id)
            return PrefillResult(token, text, stream.finish_reason, None, num_cached_tokens=num_cached_tokens,
                                 queue_ms=queue_ms)
        params = self._open_for_pull(request_id, held, len(prompt_token_ids), lease_s)
        return PrefillResult(token, text, None, params, num_cached_tokens=num_cached_tokens, queue_ms=queue_ms,
                             num_peer_loaded_tokens=num_peer_tokens,
                             num_peer_loaded_bytes=peer_load[1].num_bytes if peer_load else 0,
                             peer_load_ms=peer_load[1].seconds * 1000 if peer_load else 0.0)

    def _open_for_pull(self, key: str, held: _Held, num_tokens: int, lease_s: float) -> KVTransferParams:
        """Let one puller (the token) read held's blocks until they are released or lease_s passes (then freed)."""
        held.transfer_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(16)
        expires_at = time.time() + lease_s
        self._endpoint.allow(held.transfer_id, token, held.block_ids, expires_at)
        held.lease_timer = asyncio.get_running_loop().call_later(lease_s, self._lease_expired, key)
        return KVTransferParams(
            worker_id=self.worker_id, address=self._endpoint.address, transfer_id=held.transfer_id, token=token,
            block_ids=tuple(held.block_ids), num_tokens=num_tokens, kv_layout=self._layout,
            lease_expires_at=expires_at, host_id=self._endpoint.host_id, transports=self._endpoint.transports)

    def _count_pull(self, result: TransferResult) -> None:
        self._counters["num_kv_blocks_received"] += result.num_blocks
        self._counters["num_kv_bytes_received"] += result.num_bytes
        self._counters["kv_transfer_ms"] += result.seconds * 1000
        self._counters[f"num_kv_pulls_{result.transport}"] += 1

    def _lease_expired(self, request_id: str) -> None:
        if request_id in self._held:
            log.warning("request %s: KV lease expired before decode released it; freeing its blocks", request_id)
            self._free_request(request_id)

    async def release_kv(self, request_id: str) -> bool:
        return self._free_request(request_id)

    # ------------------------------------------------------------------------------------- decode

    async def generate(self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams,
                       first_token_id: int | None, kv_transfer_params: KVTransferParams | None,
                       resume_token_ids: tuple[int, ...] = (),
                       prefix_kv: KVTransferParams | None = None) -> AsyncIterator[TokenOutput | KVLoadReport]:
        pulls = kv_transfer_params is not None and first_token_id is not None and not resume_token_ids
        held = self._allocate(request_id, prompt_token_ids + resume_token_ids, reuse=not pulls)
        self._running.add(request_id)
        try:
            stream = TokenStream(prompt_token_ids, sampling)
            if resume_token_ids:
                # What an autoregressive engine does with prompt + generated tokens: prefill them all, then go on.
                self._counters["num_local_prefills"] += 1
                await self._compute_prefill(prompt_token_ids + resume_token_ids, held)
                for expected in resume_token_ids:
                    token, _ = stream.next()  # the client has these tokens' text already
                    if token != expected:
                        raise RuntimeError(f"request {request_id}: resumed after token {expected}, "
                                           f"this engine generates {token} there")
                    if stream.finish_reason is not None:
                        yield TokenOutput((), "", stream.finish_reason)
                        return
            elif kv_transfer_params is None or first_token_id is None:
                self._counters["num_local_prefills"] += 1
                peer_load = await self._load_prefix(request_id, prompt_token_ids, held, prefix_kv) if prefix_kv else None
                await self._compute_prefill(prompt_token_ids, held, peer_load[0] if peer_load else 0)
                token, text = stream.next()
                yield TokenOutput((token,), text, stream.finish_reason)
            else:
                report = await self._load_kv(request_id, prompt_token_ids, held, kv_transfer_params)
                self._computed(held)
                yield report
                token, _ = stream.next()  # prefill already emitted the first token's text
                if token != first_token_id:
                    raise RuntimeError(f"request {request_id}: prefill chose token {first_token_id}, decode replays {token}")
            while stream.finish_reason is None:
                await asyncio.sleep(self.config.ms_per_decode_step / 1000)
                token, text = stream.next()
                yield TokenOutput((token,), text, stream.finish_reason)
        finally:
            self._running.discard(request_id)
            self._free_request(request_id)

    async def _load_kv(self, request_id: str, prompt_token_ids: tuple[int, ...], held: _Held,
                       params: KVTransferParams) -> KVLoadReport:
        """Pull the prompt's KV from prefill; on any failure recompute it locally (never hang, never decode bad KV),
        in other blocks where the pull's READs into its own may still land (mock_fenced.py)."""
        block_ids = held.block_ids
        fence = ReadFence()
        error: str | None = None
        unreachable = False
        if params.kv_layout != self._layout:
            error = (f"KV layout differs: prefill {params.worker_id} has {params.kv_layout}, this decode worker has "
                     f"{self._layout}; run every worker with the same model, dtype and block size")
        elif len(params.block_ids) != len(block_ids):
            error = f"prefill holds {len(params.block_ids)} blocks for the prompt, decode needs {len(block_ids)}"
        else:
            try:
                result = await self._pull(request_id, params, block_ids, fence)
                if not self._kv_matches(prompt_token_ids, block_ids):
                    error = "received KV differs from what prefill computed for this prompt"
                else:
                    self._count_pull(result)
                    return KVLoadReport(result.num_blocks, result.num_bytes, result.seconds * 1000,
                                        recomputed=False, transport=result.transport)
            except TransferError as e:
                error = f"{type(e).__name__}: {e}"
                unreachable = isinstance(e, PeerUnreachable)
            except asyncio.CancelledError:
                if not fence.ended():
                    self._set_aside(request_id, held, fence)
                raise
        log.warning("request %s: KV load from %s failed (%s); recomputing the prefill locally",
                    request_id, params.worker_id, error)
        self._counters["num_recomputes"] += 1
        if not fence.ended():
            self._move_off_fenced(request_id, held, fence)
        await self._compute(len(prompt_token_ids))
        self._write_prompt_kv(prompt_token_ids, held.block_ids)
        return KVLoadReport(0, 0, 0.0, recomputed=True, error=error, unreachable=unreachable)

    async def _pull(self, request_id: str, params: KVTransferParams, block_ids: list[int],
                    fence: ReadFence | None = None) -> TransferResult:
        """The pull under a "kv pull" span, whose traceparent rides in the pull so the endpoint's span is its child."""
        attributes = {"request_id": request_id, "worker_id": self.worker_id, "prefill_worker_id": params.worker_id,
                      "transfer_id": params.transfer_id, "num_blocks": len(block_ids)}
        with tracing.span("kv pull", kind=SpanKind.CLIENT, attributes=attributes) as span:
            result = await self._client.pull(
                params.address, params.transfer_id, params.token, params.block_ids, self._pool, block_ids,
                timeout_s=self.config.kv_pull_timeout_s, traceparent=tracecontext.current(),
                peer_host_id=params.host_id, peer_transports=params.transports, fence=fence)
            span.set_attributes(tracing.transfer_attributes(result.num_blocks, result.num_bytes, result.seconds))
            span.set_attribute("kv_transport", result.transport)
            return result

    def _on_pull(self, transfer_id: str, traceparent: str | None, num_blocks: int, num_bytes: int,
                 seconds: float, transport: str) -> None:
        """On the endpoint's thread, after a pull was served: the "kv serve" span, child of the puller's span."""
        if not tracing.enabled():
            return
        request_id = next((r for r, h in list(self._held.items()) if h.transfer_id == transfer_id), "")
        attributes = {"request_id": request_id, "worker_id": self.worker_id, "transfer_id": transfer_id,
                      "kv_transport": transport, **tracing.transfer_attributes(num_blocks, num_bytes, seconds)}
        tracing.record_span("kv serve", kind=SpanKind.SERVER, seconds=seconds,
                            context=tracecontext.context_of(traceparent), attributes=attributes)

    async def _compute_prefill(self, prompt_token_ids: tuple[int, ...], held: _Held, num_peer_tokens: int = 0) -> None:
        """A local prefill: only what the prefix cache (and num_peer_tokens pulled from a peer) did not have costs
        time."""
        num_loaded = self._num_cached_tokens(held, prompt_token_ids) + num_peer_tokens
        await self._compute(len(prompt_token_ids) - num_loaded)
        self._write_prompt_kv(prompt_token_ids, held.block_ids, num_loaded // self._layout.block_size)
        self._computed(held)

    async def _compute(self, num_tokens: int) -> None:
        """The simulated time of prefilling num_tokens."""
        self._counters["num_computed_prompt_tokens"] += num_tokens
        await asyncio.sleep(num_tokens * self.config.ms_per_prompt_token / 1000)

    async def abort(self, request_id: str) -> None:
        # A running generate() frees its blocks itself once its task is cancelled (the worker cancels it):
        # freeing them here could hand them to another request while a pull still writes into them.
        if request_id not in self._running:
            self._free_request(request_id)

    # ---------------------------------------------------------------------------------- KV memory

    def _allocate(self, request_id: str, prompt_token_ids: tuple[int, ...], *, reuse: bool) -> _Held:
        """Blocks for the prompt: its leading blocks from the prefix cache where reuse allows (shared with other
        requests using them, pinned meanwhile), the rest free, evicting unpinned cached blocks when needed."""
        if request_id in self._held:
            raise EngineFull(f"request {request_id} already holds blocks on this worker")
        self._reclaim_fenced()
        num_blocks = -(-len(prompt_token_ids) // self._layout.block_size)
        hashes = block_hashes(prompt_token_ids, self._layout.block_size)
        full = hashes[:len(prompt_token_ids) // self._layout.block_size]
        hits = []
        if reuse and self.config.prefix_caching:
            hits = self._pin_cached_prefix(full)
        need = num_blocks - len(hits)
        if need > len(self._free) + self._num_evictable():
            self._unpin(hits)
            raise EngineFull(f"{num_blocks} KV blocks needed, {len(self._free) + self._num_evictable()} free")
        in_host = self._host.leading(full[len(hits):]) if reuse and self._host is not None else 0
        block_ids = hits + self._take_free(need)
        num_from_host = self._copy_from_host(full[len(hits):len(hits) + in_host], block_ids[len(hits):])
        held = self._held[request_id] = _Held(block_ids, hashes, num_cached=len(hits), num_from_host=num_from_host)
        if num_from_host:
            self._counters["num_prefix_host_loaded_tokens"] += (self._num_cached_tokens(held, prompt_token_ids)
                                                                - self._tokens_of(len(hits), prompt_token_ids))
        return held

    def _take_free(self, need: int) -> list[int]:
        """need free blocks, evicting unpinned cached blocks (least recently used first) into the host tier, if
        any, when there are too few; the caller checked there are enough."""
        evicted_hashes, evicted_blocks = [], []
        while len(self._free) < need:
            h, block = next((h, b) for h, b in self._cache.items() if not self._pins[b])
            del self._cache[h]
            self._free.append(block)
            evicted_hashes.append(h)
            evicted_blocks.append(block)
        if evicted_hashes:
            self._evict(evicted_hashes, evicted_blocks)
        return [self._free.pop() for _ in range(need)]

    def _pin_cached_prefix(self, hashes: list[int] | tuple[int, ...]) -> list[int]:
        """The cached blocks of the leading hashes (up to the first one not cached), pinned: not evicted until
        _unpin, as most recently used."""
        hits = []
        for h in hashes:
            block = self._cache.get(h)
            if block is None:
                break
            self._cache.move_to_end(h)
            self._pins[block] += 1
            hits.append(block)
        return hits

    def _hold_cached(self, key: str, block_ids: list[int], hashes: list[int], *, num_from_host: int = 0) -> _Held:
        """Hold blocks with valid KV under key, as a request holds its own: cached blocks (already pinned), then
        num_from_host fresh ones copied from the host tier; freed by _free_request(key)."""
        held = self._held[key] = _Held(block_ids, hashes, num_cached=len(block_ids) - num_from_host,
                                       num_from_host=num_from_host, computed=True)
        return held

    def _num_evictable(self) -> int:
        return len(self._cache) - len(self._pins)  # every pinned block is a cached one

    def _unpin(self, block_ids: list[int]) -> None:
        for block in block_ids:
            self._pins[block] -= 1
            if self._pins[block] <= 0:
                del self._pins[block]

    def _num_cached_tokens(self, held: _Held, prompt_token_ids: tuple[int, ...]) -> int:
        """Prompt tokens whose KV this worker had: its cache's blocks and those copied back from its host tier."""
        return self._tokens_of(held.num_cached + held.num_from_host, prompt_token_ids)

    def _tokens_of(self, num_blocks: int, prompt_token_ids: tuple[int, ...]) -> int:
        # As in vLLM, the last prompt token is always computed: its logits choose the first token.
        return min(num_blocks * self._layout.block_size, max(0, len(prompt_token_ids) - 1))

    def _computed(self, held: _Held) -> None:
        """The request's KV is written: report the new copies of its full blocks (cached ones were reported)."""
        if held.computed:
            return
        held.computed = True
        self._counters["num_cached_tokens"] += held.num_cached * self._layout.block_size
        new = held.block_hashes[held.num_cached:]
        if new and self.kv_events:
            self.kv_events.stored(new, held.block_hashes[held.num_cached - 1] if held.num_cached else ROOT_HASH)

    def _free_request(self, request_id: str) -> bool:
        """Free a request's blocks: full blocks with valid KV go to the prefix cache (tail first, so the tail
        is evicted first) unless it has that block already; the rest are free, and reported removed."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        if held.lease_timer:
            held.lease_timer.cancel()
        if held.transfer_id:
            self._endpoint.release(held.transfer_id)
        removed = []
        self._unpin(held.block_ids[:held.num_cached])  # shared cached blocks: they stay in the cache
        num_valid = len(held.block_hashes) if held.computed else held.num_cached
        for i in reversed(range(held.num_cached, len(held.block_ids))):
            block = held.block_ids[i]
            if i >= num_valid:
                self._free.append(block)
                continue
            h = held.block_hashes[i]
            if self.config.prefix_caching and h not in self._cache:
                self._cache[h] = block
            else:
                self._free.append(block)
                removed.append(h)
        if removed and self.kv_events:
            self.kv_events.removed(removed)
        return True

    def _block_arrays(self, block_ids: list[int]) -> list[np.ndarray]:
        return [np.frombuffer(self._pool.segments(b)[0], dtype=np.uint8) for b in block_ids]

    def _write_prompt_kv(self, prompt_token_ids: tuple[int, ...], block_ids: list[int], first_block: int = 0) -> None:
        """Compute the prompt's KV into its blocks from first_block on (those before were cached or loaded)."""
        fill_prompt_kv(prompt_token_ids, self._layout.block_size, self._block_arrays(block_ids), first_block)

    def _kv_matches(self, prompt_token_ids: tuple[int, ...], block_ids: list[int]) -> bool:
        expected = [np.empty(self._layout.bytes_per_block, dtype=np.uint8) for _ in block_ids]
        fill_prompt_kv(prompt_token_ids, self._layout.block_size, expected)
        return all(np.array_equal(e, got) for e, got in zip(expected, self._block_arrays(block_ids)))

    def stats(self) -> dict[str, float]:
        total = self._pool.num_blocks
        free = len(self._free) + self._num_evictable()  # cached blocks not in use are free to take, as in vLLM's pool
        endpoint = self._endpoint.stats()
        return {
            **self._counters,
            "num_held_blocks": total - free,
            "num_free_blocks": free,
            "num_cached_blocks": len(self._cache),
            "num_fenced_blocks": self.num_fenced_blocks,
            "num_host_tier_blocks": len(self._host) if self._host is not None else 0,
            "num_total_blocks": total,
            "kv_usage": (total - free) / total,
            "num_running": len(self._running),
            "num_kv_blocks_sent": endpoint["num_blocks_sent"],
            "num_kv_bytes_sent": endpoint["num_bytes_sent"],
            "num_transfers_refused": endpoint["num_transfers_refused"],
            "num_kv_transport_fallbacks": sum(self._client.fallbacks.values()),
            "kv_transports": list(self._endpoint.transports),
        }


def layout_tag(card: ModelCard) -> str:
    """What both ends of a transfer compare at the handshake: model, dtype, block size, shape."""
    k: KVLayout = card.kv_layout
    return (f"{card.name}|{k.dtype}|block_size={k.block_size}|layers={k.num_layers}|"
            f"kv_heads={k.num_kv_heads}|head_dim={k.head_dim}")
