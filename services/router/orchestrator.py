"""One request's journey: prefill on P, first token to the client, decode on D, chunks to the client.

Algorithm of `generate()`:
0. Early refusal: if the least-loaded prefill worker's queue (load x mean prefill time, see
   LeastLoadPolicy.prefill_wait_s) is already longer than the time the request has left, answer 429 at
   once instead of letting it wait for a deadline it cannot meet.
1. Route (KVAwarePolicy.plan): ask the KV broker which workers hold how many of the prompt's blocks (deadline
   kv_lookup_timeout_s; no answer: load alone decides) and choose P and D by cost (blocks to recompute
   against load). The decode worker prefills itself, with no P, when it holds the whole prompt, when little
   is left after its cache hit, or when every prefill queue is full. One log line and the "route" span say
   where and why.
   Prefill: ask P (NATS request, deadline
   prefill_timeout_s, cut short when P is gone: missed heartbeats). On a timeout, a vanished worker or a
   retryable error, cancel on P and try another prefill worker (up to max_attempts). If every try failed,
   the decode worker prefills locally. A worker nobody listens for (NoResponders: dead, or reconnecting to
   NATS) costs no attempt; the request goes elsewhere, or tries it again shortly (_Candidates).
2. The first token (from P's KV-ready answer) goes to the client at once; if it already ends the request
   (max_tokens=1, a stop string) we are done.
3. Decode: open a queue for (request, D) on the router's one stream subscription, then ask the planned
   decode worker D (on a retry: the least-loaded other one) to decode with P's KV location. Read chunks in order (sequence numbers) with an idle
   deadline. If D fails, stalls, or is gone (missed heartbeats), cancel on D and try another decode worker
   (up to max_attempts): before D streamed anything it pulls the same KV (or recomputes it); after, it
   resumes: it prefills prompt + every token the client already has and continues from there, so the client
   sees one uninterrupted stream. After the router's own NATS connection came back (a NATS restart) chunks
   may have been lost, the last one too: each stream then waits for its next chunk only as long as a silent
   worker takes to be declared gone (3 heartbeats), not its idle deadline. With no worker left, the stream
   ends with a clear error. If every decode worker tried
   refused because it is full, the answer is 429 with Retry-After (overload is not a failure).
4. However the request ends (done, error, client gone), a cancel goes to whichever worker still works on it,
   so nothing stays allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

from pdserve import subjects, tracecontext, tracing
from pdserve.bus import Bus, BusError, BusTimeout, NoResponders, RemoteError
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.kv.hashing import block_hashes
from pdserve.protocol import (CancelRequest, DecodeAccepted, DecodeRequest, Heartbeat, KVLookup, KVLookupReply,
                              KVReady, ModelCard, PrefillRequest, TokenChunk, Usage, encode)
from pdserve.tokenizer import Tokenizer, load_tokenizer
from pdserve.metrics import RequestTimer, RouterMetrics
from services.router.backend import (BackendError, BusUnavailable, GenerateDelta, GenerateRequest, NoWorkerError,
                                     Overloaded, RequestTooLarge, UpstreamError, UpstreamTimeout)
from pdserve.tracing import Span, SpanKind
from services.router.policy import CostWeights, KVAwarePolicy, RoutePlan

log = logging.getLogger(__name__)
T = TypeVar("T")

# ErrorReply codes of a worker that is full (queue bound, KV memory): try another, else 429.
OVERLOAD_CODES = frozenset({"overloaded", "kv_full"})
# Retry-After when every worker is full: a decode worker frees a slot as soon as any of its requests ends.
WORKERS_FULL_RETRY_AFTER_S = 1.0


_NOTHING = object()
_RECONNECTED = object()  # queued on every stream when the router's NATS connection came back


def _check_chunk(chunk: TokenChunk | None, expected_seq: int, worker_id: str) -> None:
    """Raise _DecodeFailed unless chunk is the next good one (None: the worker is gone)."""
    if chunk is None:
        raise _DecodeFailed(f"decode worker {worker_id} is gone (missed heartbeats)", retryable=True)
    if chunk.seq != expected_seq:
        # Resuming from the tokens the client has is right whatever was lost in between.
        raise _DecodeFailed(f"chunk {chunk.seq} arrived, expected {expected_seq}; tokens were lost", retryable=True)
    if chunk.error:
        raise _DecodeFailed(chunk.error, retryable=True)


class _DecodeFailed(Exception):
    """A decode attempt failed; `retryable` when another worker may do better (after streamed tokens: by
    resuming after them), not when the worker refused for good; `overloaded` when the
    worker refused because it is full; `not_listening` when nobody received the request (NoResponders)."""

    def __init__(self, message: str, *, retryable: bool, timeout: bool = False, overloaded: bool = False,
                 not_listening: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        self.overloaded = overloaded
        self.not_listening = not_listening


# What _refuse_if_too_large adds to a decode request's encoded size: ids still to come (block ids of at least
# 16 tokens each, resumed tokens) at their longest, and room for the KV location, headers and trace context.
_MAX_ID_BYTES = 11
_MIN_BLOCK_SIZE = 16
_ENVELOPE_BYTES = 4096

# How long a request waits before it tries again workers that were not listening (see _Candidates).
NOT_LISTENING_PAUSE_S = 0.25


class _Candidates:
    """The workers of one role a request may still try.

    A worker that failed the request is not tried again, and at most max_attempts may fail. A worker that was
    not listening (NoResponders: nobody subscribes to its subject right now) costs no attempt: it died (NATS
    dropped its subscriptions with its connection) or it, or this router, is reconnecting to NATS. The request
    moves on to another worker at once; when only such workers are left, it tries them again after a short
    pause (after a NATS restart, workers subscribe again within moments; a dead one leaves the membership
    within its heartbeat allowance), for at most budget_s in all.
    """

    def __init__(self, max_attempts: int, budget_s: float):
        self.max_attempts = max_attempts
        self.budget_s = budget_s
        self.failed: list[str] = []
        self.not_listening: list[str] = []
        self.waited_s = 0.0

    @property
    def excluded(self) -> list[str]:
        return self.failed + self.not_listening

    def more(self) -> bool:
        return len(self.failed) < self.max_attempts

    async def pause(self, remaining_s: float) -> bool:
        """Called when no other worker is left: wait, then let the workers that were not listening be tried
        again; False (at once) when there is none to wait for or no time left."""
        if not self.not_listening or self.waited_s + NOT_LISTENING_PAUSE_S > min(self.budget_s, remaining_s):
            return False
        await asyncio.sleep(NOT_LISTENING_PAUSE_S)
        self.waited_s += NOT_LISTENING_PAUSE_S
        self.not_listening.clear()
        return True


class _WorkerGone(BusError):
    """The worker a request waits on missed its heartbeats: its answer will not come."""


@dataclass
class _Stream:
    """The token chunks of one decode attempt, and the secret only its decode worker was given."""

    chunks: asyncio.Queue  # TokenChunk, None (the worker is gone) or _RECONNECTED
    token: str


class Orchestrator:
    def __init__(self, config: RouterConfig, bus: Bus, membership: Membership, metrics: RouterMetrics):
        self.config = config
        self.bus = bus
        self.membership = membership
        self.metrics = metrics
        self.policy = KVAwarePolicy(
            membership, CostWeights(config.route_w_recompute, config.route_w_queue, config.route_w_running,
                                    config.route_w_kv),
            config.routing, config.local_prefill_max_tokens, config.prefill_queue_limit)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenizer_loads: dict[str, asyncio.Task] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}  # (request_id, worker_id)
        self._gone_waiters: dict[str, set[asyncio.Future]] = {}  # worker_id -> requests waiting on its answer
        self._reconnect_waiters: set[asyncio.Future] = set()  # requests waiting on an answer over NATS
        membership.on_join.append(self._on_worker_joined)
        membership.on_gone.append(self._on_worker_gone)
        bus.on_reconnect.append(self._on_reconnect)

    # ----------------------------------------------------------------------------- Backend protocol

    def models(self) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        for hb in self.membership.live():
            if hb.model is not None:
                cards.setdefault(hb.model.name, hb.model)
        return list(cards.values())

    def tokenizer(self, model: str) -> Tokenizer:
        card = next(c for c in self.models() if c.name == model)
        if card.tokenizer not in self._tokenizers:  # not loaded in the background yet: load it now
            self._tokenizers[card.tokenizer] = load_tokenizer(card.tokenizer)
        return self._tokenizers[card.tokenizer]

    def _on_worker_joined(self, hb: Heartbeat) -> None:
        """Load a new model's tokenizer off the event loop (a Hugging Face one takes seconds), before its
        first request: a blocked loop would also stall heartbeats and make every worker look gone."""
        name = hb.model.tokenizer if hb.model else None
        if name is None or name in self._tokenizers or name in self._tokenizer_loads:
            return

        async def load() -> None:
            try:
                self._tokenizers[name] = await asyncio.to_thread(load_tokenizer, name)
                log.info("tokenizer %s loaded", name)
            except ValueError as e:
                log.error("cannot load tokenizer %s: %s", name, e)
            finally:
                self._tokenizer_loads.pop(name, None)

        self._tokenizer_loads[name] = asyncio.get_running_loop().create_task(load())

    def health(self) -> dict:
        live = self.membership.live()
        workers = [{"worker_id": hb.worker_id, "role": hb.role, "model": hb.model.name if hb.model else None,
                    "num_requests_served": hb.num_requests_served, "num_queued": hb.num_queued,
                    "num_running": hb.num_running, "kv_usage": hb.kv_usage,
                    "transfer_address": hb.transfer_address, "metrics_address": hb.metrics_address}
                   for hb in live if hb.role != "broker"]
        brokers = [hb.worker_id for hb in live if hb.role == "broker"]
        roles = {w["role"] for w in workers}
        problems = []  # each names what is missing and what it costs
        if not self.bus.connected:
            problems.append("NATS: this router lost its connection and is reconnecting; requests get 503 meanwhile")
        problems += [f"no live {role} worker: requests get 503" for role in ("prefill", "decode") if role not in roles]
        if not all(hb.model.tokenizer in self._tokenizers for hb in live if hb.model):
            problems.append("loading a model's tokenizer")
        serving = not problems
        if not brokers and self.config.routing == "kv":
            problems.append("no live KV broker: KV-aware routing is off, requests are routed by load alone")
        return {"status": "ok" if not problems else "degraded", "serving": serving, "problems": problems,
                "router_id": self.config.router_id, "nats_connected": self.bus.connected, "workers": workers,
                "kv_brokers": brokers}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        timer = RequestTimer(self.metrics)
        outcome = "cancelled"  # unless it ends otherwise: the client went away
        try:
            # The HTTP server span is current when served over HTTP; otherwise continue the client's trace.
            with tracecontext.continue_or_start(request.traceparent):
                # aclosing: inner generators end in this task (and its trace context), not later in a GC hook
                async with contextlib.aclosing(self._generate(request)) as deltas:
                    async for delta in deltas:
                        timer.on_tokens(len(delta.token_ids))
                        if delta.finish_reason is not None:
                            outcome = "ok" if delta.finish_reason in ("stop", "length") else delta.finish_reason
                        yield delta
        except BackendError as e:
            outcome = e.code
            raise
        except Exception:
            outcome = "internal_error"
            raise
        finally:
            timer.finish(outcome)

    # ------------------------------------------------------------------------------------ internals

    async def _generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        attributes = {"request_id": req.request_id, "model": req.model, "num_prompt_tokens": len(req.prompt_token_ids)}
        if req.client_request_id:
            attributes["client_request_id"] = req.client_request_id
        with tracing.span("route", attributes=attributes) as route:
            started = time.monotonic()
            if not self.bus.connected:
                raise BusUnavailable("The router has lost its connection to NATS and is reconnecting by itself; "
                                     "retry after the time in the Retry-After header.")
            self._refuse_if_too_large(req)
            for role in ("prefill", "decode"):
                if not self.membership.live(role, req.model):
                    raise NoWorkerError(f"no live {role} worker serves model {req.model!r}; start one with "
                                        f"`pdserve {role}-worker --nats URL --model {req.model}` (pdserve up starts both)")
            self._refuse_if_late(req)
            plan = await self._plan(req)
            route.set_attributes(plan.attributes())
            ready = await self._prefill(req, plan) if plan.prefill is not None else None
            if ready is not None:
                route.set_attributes({"prefill_worker_id": ready.worker_id, "ttft_ms": (time.monotonic() - started) * 1000})
                usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=1) if ready.finish_reason else None
                yield GenerateDelta(ready.first_text, (ready.first_token_id,), ready.finish_reason, usage)
                if ready.finish_reason is not None:
                    return
            finished = False
            try:
                async with contextlib.aclosing(self._decode(req, ready, route, plan)) as deltas:
                    async for delta in deltas:
                        finished = delta.finish_reason is not None
                        yield delta
            finally:
                if not finished and ready is not None and ready.kv_transfer_params is not None:
                    await self._cancel(req.request_id, ready.worker_id)  # free the KV prefill still holds

    async def _plan(self, req: GenerateRequest) -> RoutePlan:
        """Where the request goes (KVAwarePolicy.plan), from the KV broker's lookup and the workers' load; one
        log line says where and why. A lookup that fails or comes late leaves load alone to decide."""
        card = next(c for c in self.models() if c.name == req.model)
        block_size = card.kv_layout.block_size
        matched, kv_lookup = await self._lookup(req, block_size)
        plan = self.policy.plan(req.model, len(req.prompt_token_ids), block_size, matched, kv_lookup)
        if plan is None:
            raise NoWorkerError(f"no live decode worker serves model {req.model!r}")
        self.metrics.route_decisions.labels(reason=plan.reason).inc()
        if plan.prefill is None:
            self.metrics.local_prefills.inc()
        log.info("request %s: route %s: prefill %s (%d of %d blocks cached), decode %s (%d cached); kv lookup %s",
                 req.request_id, plan.reason, plan.prefill.worker_id if plan.prefill else "none (decode prefills)",
                 plan.num_matched_blocks(plan.prefill), plan.num_prompt_blocks, plan.decode.worker_id,
                 plan.num_matched_blocks(plan.decode), kv_lookup)
        return plan

    async def _lookup(self, req: GenerateRequest, block_size: int) -> tuple[dict[str, int], str]:
        """(worker_id -> leading prompt blocks it holds, how the lookup went): ok, timeout, error, no_broker, off."""
        if self.config.routing != "kv" or len(req.prompt_token_ids) < block_size:
            return {}, "off"
        if not self.membership.live("broker"):
            return {}, "no_broker"
        msg = KVLookup(model=req.model, block_hashes=tuple(block_hashes(req.prompt_token_ids, block_size)))
        try:
            reply = await self.bus.request(subjects.KV_LOOKUP, msg, KVLookupReply, request_id=req.request_id,
                                           timeout_s=max(0.001, min(self.config.kv_lookup_timeout_s, self._remaining(req))))
            return dict(reply.num_matched_blocks), "ok"
        except BusTimeout:
            log.warning("request %s: no KV lookup answer within %.3fs; routing by load", req.request_id,
                        self.config.kv_lookup_timeout_s)
            return {}, "timeout"
        except Exception as e:  # never fail a request for its lookup: load alone decides
            log.warning("request %s: KV lookup failed (%s); routing by load", req.request_id, e)
            return {}, "error"

    async def _prefill(self, req: GenerateRequest, plan: RoutePlan) -> KVReady | None:
        """KV-ready from some prefill worker (the plan's first), or None when all tries failed (decode then
        prefills locally)."""
        candidates = _Candidates(self.config.max_attempts, self.config.prefill_timeout_s)
        while candidates.more():
            worker = plan.prefill if not candidates.excluded else self.policy.choose(
                "prefill", req.model, exclude=candidates.excluded, num_prompt_blocks=plan.num_prompt_blocks,
                matched=plan.matched)
            if worker is None:
                if await candidates.pause(self._remaining(req)):
                    continue
                break
            timeout_s = min(self.config.prefill_timeout_s, self._remaining(req))
            msg = PrefillRequest(request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
                                 sampling=req.sampling, deadline=time.time() + timeout_s)
            seen = self.policy.acquire(worker.worker_id)
            with tracing.span("prefill request", kind=SpanKind.CLIENT,
                              attributes={"request_id": req.request_id, "worker_id": worker.worker_id}) as span:
                try:
                    ready = await self._unless_gone(worker.worker_id, self.bus.request(
                        subjects.prefill_request(worker.worker_id), msg, KVReady, timeout_s=timeout_s,
                        request_id=req.request_id))
                    params = ready.kv_transfer_params
                    span.set_attributes({"num_prompt_tokens": ready.num_prompt_tokens, "prefill_ms": ready.prefill_ms,
                                         "num_cached_tokens": ready.num_cached_tokens,
                                         "num_blocks": len(params.block_ids) if params else 0})
                    log.info("request %s: prefill on %s: %d prompt tokens in %.1f ms", req.request_id, worker.worker_id,
                             ready.num_prompt_tokens, ready.prefill_ms)
                    self.metrics.prompt_tokens.inc(ready.num_prompt_tokens)
                    self.metrics.cached_prompt_tokens.inc(ready.num_cached_tokens)
                    self.policy.prefill_time.observe((ready.prefill_ms - ready.queue_ms) / 1000)
                    return ready
                except RemoteError as e:
                    tracing.record_error(span, str(e))
                    log.warning("request %s: prefill worker %s refused: %s", req.request_id, worker.worker_id, e)
                    if not e.reply.retryable:
                        raise UpstreamError(f"prefill worker {worker.worker_id}: {e.reply.message}") from e
                    candidates.failed.append(worker.worker_id)
                except NoResponders as e:  # nobody got the request: nothing to cancel
                    tracing.record_error(span, str(e))
                    log.warning("request %s: prefill worker %s is not listening (%s); trying elsewhere",
                                req.request_id, worker.worker_id, e)
                    self.metrics.retries.labels(role="prefill").inc()
                    candidates.not_listening.append(worker.worker_id)
                except BusError as e:
                    tracing.record_error(span, str(e))
                    log.warning("request %s: prefill worker %s failed (%s); trying elsewhere", req.request_id,
                                worker.worker_id, e)
                    self.metrics.retries.labels(role="prefill").inc()
                    candidates.failed.append(worker.worker_id)
                    await self._cancel(req.request_id, worker.worker_id)
                finally:
                    self.policy.release(worker.worker_id, seen)
            if self._remaining(req) <= 0:
                raise UpstreamTimeout(f"request {req.request_id} ran out of time during prefill")
        log.warning("request %s: no prefill worker answered (tried %s); decode will prefill locally",
                    req.request_id, ", ".join(candidates.excluded) or "none")
        self.metrics.local_prefills.inc()
        return None

    async def _decode(self, req: GenerateRequest, ready: KVReady | None, route: Span, plan: RoutePlan
                      ) -> AsyncIterator[GenerateDelta]:
        candidates = _Candidates(self.config.max_attempts, self.config.decode_accept_timeout_s)
        last_error: _DecodeFailed | None = None
        num_full = 0  # attempts refused because the worker was full
        # Every token the client has, once a decode attempt streamed some: later attempts resume after them.
        streamed: list[int] | None = None
        while candidates.more():
            if not candidates.excluded and (ready is None) == (plan.prefill is None):
                worker = plan.decode  # as planned (not after a failed prefill: any decode worker may do)
            elif ready is None:  # it prefills: its own cache hit counts
                worker = self.policy.choose("decode", req.model, exclude=candidates.excluded,
                                            num_prompt_blocks=plan.num_prompt_blocks, matched=plan.matched)
            else:
                worker = self.policy.choose("decode", req.model, exclude=candidates.excluded)
            if worker is None:
                if await candidates.pause(self._remaining(req)):
                    continue
                break
            route.set_attribute("decode_worker_id", worker.worker_id)
            resume = tuple(streamed) if streamed is not None else ()
            if resume:
                self.metrics.resumes.inc()
                route.set_attribute("num_resumed_tokens", len(resume))
                log.info("request %s: resuming on %s after %d tokens", req.request_id, worker.worker_id, len(resume))
            seen = self.policy.acquire(worker.worker_id)
            try:
                async with contextlib.aclosing(
                        self._decode_on(req, None if resume else ready, worker.worker_id, resume)) as deltas:
                    async for delta in deltas:
                        if streamed is None:
                            streamed = [ready.first_token_id] if ready is not None else []
                        streamed.extend(delta.token_ids)
                        yield delta
                return
            except _DecodeFailed as e:
                log.warning("request %s: decode on %s failed: %s", req.request_id, worker.worker_id, e)
                last_error = e
                num_full += e.overloaded
                (candidates.not_listening if e.not_listening else candidates.failed).append(worker.worker_id)
                if not e.retryable:
                    break
                self.metrics.retries.labels(role="decode").inc()
            finally:
                self.policy.release(worker.worker_id, seen)
        if last_error is None:
            raise NoWorkerError(f"no live decode worker serves model {req.model!r}")
        if num_full and num_full == len(candidates.failed):
            raise Overloaded(f"Every decode worker is full ({num_full} tried); retry after the time in the "
                             "Retry-After header.", retry_after_s=WORKERS_FULL_RETRY_AFTER_S)
        error_cls = UpstreamTimeout if last_error.timeout else UpstreamError
        raise error_cls(f"decode failed after {len(candidates.excluded)} attempt(s): {last_error}")

    async def _decode_on(self, req: GenerateRequest, ready: KVReady | None, worker_id: str,
                         resume_token_ids: tuple[int, ...]) -> AsyncIterator[GenerateDelta]:
        """One decode attempt on worker_id, under a client span that lasts until its last chunk."""
        with tracing.span("decode request", kind=SpanKind.CLIENT,
                          attributes={"request_id": req.request_id, "worker_id": worker_id,
                                      "num_resumed_tokens": len(resume_token_ids)}) as span:
            num_tokens = 0
            async with contextlib.aclosing(self._decode_stream(req, ready, worker_id, resume_token_ids)) as deltas:
                async for delta in deltas:
                    num_tokens += len(delta.token_ids)
                    span.set_attribute("num_streamed_tokens", num_tokens)
                    yield delta

    async def _decode_stream(self, req: GenerateRequest, ready: KVReady | None, worker_id: str,
                             resume_token_ids: tuple[int, ...]) -> AsyncIterator[GenerateDelta]:
        stream_subject = subjects.token_stream(self.config.router_id, req.request_id)
        chunks: asyncio.Queue[TokenChunk | None | object] = asyncio.Queue()  # None: the worker is gone; or _RECONNECTED
        stream_key = (req.request_id, worker_id)  # a late chunk of an earlier attempt finds no queue
        stream = _Stream(chunks, secrets.token_hex(16))  # a new secret per attempt: only this worker has it
        self._streams[stream_key] = stream
        finished = False
        delivered = True  # whether the worker may have the request (then a cancel must follow, unless it finished)
        num_chunks = 0
        try:
            msg = DecodeRequest(
                request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
                sampling=req.sampling, first_token_id=ready.first_token_id if ready else None,
                kv_transfer_params=ready.kv_transfer_params if ready else None, stream_subject=stream_subject,
                stream_token=stream.token, deadline=req.deadline, resume_token_ids=resume_token_ids,
            )
            timeout_s = min(self.config.decode_accept_timeout_s, self._remaining(req))
            try:
                await self._unless_gone(worker_id, self.bus.request(
                    subjects.decode_request(worker_id), msg, DecodeAccepted, timeout_s=timeout_s,
                    request_id=req.request_id))
            except RemoteError as e:
                delivered = False  # refused: it holds nothing of the request
                raise _DecodeFailed(f"refused: {e.reply.message}", retryable=e.reply.retryable,
                                    overloaded=e.reply.code in OVERLOAD_CODES) from e
            except BusError as e:
                delivered = not isinstance(e, NoResponders)  # nobody got it: nothing to cancel
                raise _DecodeFailed(str(e), retryable=True, timeout=isinstance(e, BusTimeout),
                                    not_listening=isinstance(e, NoResponders)) from e
            held: TokenChunk | None | object = _NOTHING  # a chunk taken while coalescing, not yet checked
            idle_s, why = self.config.stream_idle_timeout_s, ""
            while True:
                if held is not _NOTHING:
                    chunk, held = held, _NOTHING
                else:
                    chunk = await self._next_chunk(chunks, min(idle_s, self._remaining(req)), why)
                if chunk is _RECONNECTED:
                    # What the worker published while we were away is lost; if that was its last chunk, nothing
                    # more comes. Wait only as long as a silent worker takes to be declared gone, then resume.
                    idle_s = min(idle_s, self._silence_allowance_s(worker_id))
                    why = " after the router reconnected to NATS (chunks lost meanwhile)"
                    continue
                idle_s, why = self.config.stream_idle_timeout_s, ""
                _check_chunk(chunk, num_chunks, worker_id)
                num_chunks += 1
                texts, token_ids = [chunk.text], list(chunk.token_ids)
                # Chunks already queued (the router fell behind the worker) go out as one delta: one SSE event
                # and one socket write instead of one per token, which is where a loaded router's time goes.
                while chunk.finish_reason is None and not chunks.empty():
                    following = chunks.get_nowait()
                    if following is None or following is _RECONNECTED or following.error or following.seq != num_chunks:
                        held = following
                        break
                    chunk = following
                    num_chunks += 1
                    texts.append(chunk.text)
                    token_ids.extend(chunk.token_ids)
                finished = chunk.finish_reason is not None
                yield GenerateDelta("".join(texts), tuple(token_ids), chunk.finish_reason, chunk.usage)
                if finished:
                    return
        finally:
            self._streams.pop(stream_key, None)
            if not finished and delivered:  # failed, stalled, or the client went away: stop the work, free its KV
                await self._cancel(req.request_id, worker_id)

    async def start(self) -> None:
        """One subscription for every token stream of this router, made once: a per-request subscription
        would cost a round trip to NATS per request and could race the decode worker's first chunk."""
        await self.bus.subscribe(subjects.token_streams(self.config.router_id), TokenChunk, self._on_chunk)

    @staticmethod
    async def _next_chunk(chunks: asyncio.Queue, timeout_s: float, why: str = "") -> TokenChunk | None | object:
        if not chunks.empty():
            return chunks.get_nowait()
        try:  # wait_for costs a task and a timer (~20 us on 3.11): only when there is something to wait for
            return await asyncio.wait_for(chunks.get(), timeout=max(timeout_s, 0.001))
        except asyncio.TimeoutError:
            raise _DecodeFailed(f"no tokens for {timeout_s:.1f}s{why}", retryable=True, timeout=True) from None

    def _silence_allowance_s(self, worker_id: str) -> float:
        """How long a worker may stay silent before membership declares it gone."""
        hb = self.membership.get(worker_id)
        return subjects.HEARTBEAT_MISSES * hb.interval_s if hb else 0.0

    def _on_reconnect(self) -> None:
        """This router's NATS connection came back: token chunks published meanwhile (or before our
        subscription was back) are lost; tell every stream in flight."""
        for stream in list(self._streams.values()):
            stream.chunks.put_nowait(_RECONNECTED)
        for reconnected in list(self._reconnect_waiters):
            if not reconnected.done():
                reconnected.set_result(None)

    def _on_worker_gone(self, worker_id: str) -> None:
        """Wake every request still waiting on a worker that died (for its answer or its next chunk): it moves
        on now, not at its deadline (a prefill deadline is long: a worker killed -9 would cost all of it)."""
        for (_, stream_worker_id), stream in list(self._streams.items()):
            if stream_worker_id == worker_id:
                stream.chunks.put_nowait(None)
        for gone in self._gone_waiters.pop(worker_id, ()):
            if not gone.done():
                gone.set_result(None)

    async def _unless_gone(self, worker_id: str, request: Awaitable[T]) -> T:
        """request's answer, or _WorkerGone as soon as worker_id is declared gone (its request is dropped).

        Also _WorkerGone when this router's NATS connection came back meanwhile and the answer does not come
        within the time a silent worker takes to be declared gone: a reply published while the router was away
        is lost, and waiting out the request's whole deadline (a minute for a prefill) would add it to the outage.
        """
        loop = asyncio.get_running_loop()
        gone, reconnected = loop.create_future(), loop.create_future()
        waiters = self._gone_waiters.setdefault(worker_id, set())
        waiters.add(gone)
        self._reconnect_waiters.add(reconnected)
        answer = asyncio.ensure_future(request)
        try:
            await asyncio.wait((answer, gone, reconnected), return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and not gone.done():
                grace_s = max(self._silence_allowance_s(worker_id), NOT_LISTENING_PAUSE_S)
                await asyncio.wait((answer, gone), timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
                if not answer.done() and not gone.done():
                    raise _WorkerGone(f"no answer from worker {worker_id} within {grace_s:.1f}s after the router "
                                      "reconnected to NATS (the answer was lost meanwhile)")
            if not answer.done():
                raise _WorkerGone(f"worker {worker_id} is gone (missed heartbeats)")
            return answer.result()
        finally:
            if not answer.done():  # its reply is of no use any more; nor its error, should it still come
                answer.cancel()
                answer.add_done_callback(lambda task: task.cancelled() or task.exception())
            waiters.discard(gone)
            self._reconnect_waiters.discard(reconnected)
            if not waiters and self._gone_waiters.get(worker_id) is waiters:
                del self._gone_waiters[worker_id]

    async def _on_chunk(self, chunk: TokenChunk) -> None:
        stream = self._streams.get((chunk.request_id, chunk.worker_id))
        if stream is None:
            log.debug("request %s: dropped a chunk from %s (request over or moved)", chunk.request_id[:200],
                      chunk.worker_id[:200])
            return
        if not hmac.compare_digest(stream.token.encode(), chunk.stream_token.encode()):
            log.warning("request %s: dropped a chunk that claims to be from %s without its stream token",
                        chunk.request_id, chunk.worker_id)
            return
        stream.chunks.put_nowait(chunk)

    async def _cancel(self, request_id: str, worker_id: str) -> None:
        try:
            await self.bus.publish(subjects.CANCEL, CancelRequest(request_id=request_id, worker_id=worker_id),
                                   request_id=request_id)
        except Exception as e:  # NATS down: leases and deadlines free the rest
            log.warning("request %s: cancel to %s not sent: %s", request_id, worker_id, e)

    def _refuse_if_too_large(self, req: GenerateRequest) -> None:
        """RequestTooLarge (413) when the request's largest message on the bus would exceed the NATS server's
        max_payload: the decode request, with the prompt's token ids, the stop strings, the KV's block ids and,
        on a resume, every token generated (counted at their longest, 10 digits and a comma each). The request is
        encoded only when a cheap upper bound does not already fit: not on every request's path."""
        num_ids_later = req.sampling.max_tokens + len(req.prompt_token_ids) // _MIN_BLOCK_SIZE + 1
        bound = (_MAX_ID_BYTES * (len(req.prompt_token_ids) + num_ids_later) + _ENVELOPE_BYTES
                 + 6 * sum(len(s) for s in req.sampling.stop) + len(req.request_id) + len(req.model))
        if bound <= self.bus.max_payload:  # 6 bytes per character: the longest JSON escape
            return
        probe = DecodeRequest(request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
                              sampling=req.sampling, stream_subject=subjects.token_stream(self.config.router_id,
                                                                                          req.request_id),
                              stream_token="0" * 32, deadline=req.deadline)
        size = len(encode(probe)) + _MAX_ID_BYTES * num_ids_later + _ENVELOPE_BYTES
        if size > self.bus.max_payload:
            raise RequestTooLarge(
                f"This request needs about {size} bytes as one message on the bus (its prompt as token ids, stop "
                f"strings and up to max_tokens generated tokens), more than the NATS server's max_payload of "
                f"{self.bus.max_payload} bytes. Shorten the prompt, the stop strings or max_tokens; operators raise "
                "max_payload in nats-server's configuration (pdserve up starts its own with 8 MiB).")

    def _refuse_if_late(self, req: GenerateRequest) -> None:
        """Overloaded (429) when the prefill queue alone outlasts the request's deadline (config.early_refusal)."""
        if not self.config.early_refusal:
            return
        wait_s = self.policy.prefill_wait_s(req.model)
        left_s = self._remaining(req)
        if wait_s is not None and wait_s > left_s:
            log.warning("request %s: refused at once: prefill queue ~%.1fs, %.1fs left until its deadline",
                        req.request_id, wait_s, left_s)
            raise Overloaded(f"The prefill queue is about {wait_s:.1f}s long, more than the {left_s:.1f}s this "
                             "request may take; retry after the time in the Retry-After header.",
                             retry_after_s=wait_s - left_s)

    @staticmethod
    def _remaining(req: GenerateRequest) -> float:
        return req.deadline - time.time()
