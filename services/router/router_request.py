"""One request in flight in the router, as one object: what it asked for, where it goes, what it holds.

Algorithm of `RouterRequest.run()`:
0. Admission: the bus is up, the request fits in one message on the bus, live workers of both roles serve
   its model (else 503 / 413 at once); with early refusal, if the least-loaded prefill worker's queue (load x
   mean prefill time, LeastLoadPolicy.prefill_wait_s) is longer than the time the request has left, 429 at
   once instead of letting it wait for a deadline it cannot meet.
1. Plan (route_planner.RoutePlanner): ask the KV broker which workers hold how many of the prompt's blocks
   (deadline kv_lookup_timeout_s; no answer: load alone decides) and choose P and D by cost (blocks to
   recompute against load). The decode worker prefills itself, with no P, when it holds the whole prompt,
   when little is left after its cache hit, or when every prefill queue is full.
2. Prefill attempts (attempts.prefill_on): ask P (deadline prefill_timeout_s, cut short when P is gone). On a
   timeout, a vanished worker or a retryable error, cancel on P and try another prefill worker (up to
   max_attempts). A worker nobody listens for (NoResponders: dead, or reconnecting to NATS) costs no attempt
   (attempts.Candidates). If every try failed, the decode worker prefills locally.
3. The first token (from P's KV-ready answer) goes to the client at once; if it already ends the request
   (max_tokens=1, a stop string) we are done.
4. Decode attempts (attempts.DecodeAttempt): the planned D (on a retry: the least-loaded other one) decodes
   with P's KV location; its chunks reach the client in order. If D fails, stalls, or is gone, cancel on D
   and try another decode worker (up to max_attempts): before D streamed anything it pulls the same KV (or
   recomputes it); after, it resumes: it prefills prompt + every token the client already has and continues
   from there, so the client sees one uninterrupted stream. With no worker left, a clear error; if every
   decode worker tried refused because it is full, 429 with Retry-After (overload is not a failure).
5. However the request ends (done, error, client gone), one `finally` sends a cancel to every worker that
   may still hold work or KV of it (`holders`), so nothing stays allocated.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from pdserve import subjects, tracecontext, tracing
from pdserve.metrics import RequestTimer
from pdserve.protocol import CancelRequest, Heartbeat, KVReady, KVTransferParams, ModelCard, Usage
from pdserve.tracing import Span, SpanKind
from services.router.admission import refuse_if_late, refuse_unless_servable
from services.router.attempts import AttemptFailed, Candidates, DecodeAttempt, prefill_on
from services.router.backend import GenerateDelta, GenerateRequest
from services.router.errors import NoWorkerError, Overloaded, RouterError, UpstreamError, UpstreamTimeout
from services.router.policy import RoutePlan, reaches
from services.router.shared import Shared

log = logging.getLogger(__name__)

# Retry-After when every worker is full: a decode worker frees a slot as soon as any of its requests ends.
WORKERS_FULL_RETRY_AFTER_S = 1.0


class RouterRequest:
    def __init__(self, router: Shared, req: GenerateRequest):
        self.router = router
        self.req = req
        self.card: ModelCard | None = None
        self.plan: RoutePlan | None = None
        self.ready: KVReady | None = None  # P's answer: the first token and where the prompt's KV is
        self.streamed: list[int] | None = None  # every token the client has, once a decode attempt streamed some
        self.holders: set[str] = set()  # workers that may hold work or KV of this request
        self.num_decode_attempts = 0
        self.finished = False
        self.span: Span | None = None  # "route": the router's span of the whole request
        self._timer = RequestTimer(router.metrics)
        self._outcome = "cancelled"  # unless it ends otherwise: the client went away

    async def run(self) -> AsyncIterator[GenerateDelta]:
        req, router = self.req, self.router
        attributes = {"request_id": req.request_id, "model": req.model, "num_prompt_tokens": len(req.prompt_token_ids)}
        if req.client_request_id:
            attributes["client_request_id"] = req.client_request_id
        # The HTTP server span is current when served over HTTP; otherwise continue the client's trace.
        with tracecontext.continue_or_start(req.traceparent), tracing.span("route", attributes=attributes) as span:
            self.span = span
            try:
                started = time.monotonic()
                await self._admit_and_plan()
                if self.plan.prefill is not None:
                    self.ready = await self._prefill()
                if self.ready is not None:
                    ready = self.ready
                    span.set_attributes({"prefill_worker_id": ready.worker_id,
                                         "ttft_ms": (time.monotonic() - started) * 1000})
                    usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=1) if ready.finish_reason else None
                    yield self._delivered(GenerateDelta(ready.first_text, (ready.first_token_id,), ready.finish_reason, usage))
                    if self.finished:
                        return
                candidates = Candidates(router.config.max_attempts, router.config.decode_accept_timeout_s)
                last_error: AttemptFailed | None = None
                num_full = 0  # attempts refused because the worker was full
                while candidates.more():
                    worker = self._decode_worker(candidates)
                    if worker is None:
                        if await candidates.pause(req.remaining_s()):
                            continue
                        break
                    attempt = await self._decode_attempt(worker.worker_id)
                    seen = router.policy.acquire(worker.worker_id)
                    try:
                        with tracing.span("decode request", kind=SpanKind.CLIENT,
                                          attributes={"request_id": req.request_id, "worker_id": worker.worker_id,
                                                      "num_resumed_tokens": len(attempt.resume_token_ids)}) as attempt_span:
                            self.holders.add(worker.worker_id)  # from the moment it may get the request
                            await attempt.send()
                            while not self.finished:
                                delta = await attempt.next_delta()
                                if self.streamed is None:
                                    self.streamed = [self.ready.first_token_id] if self.ready is not None else []
                                self.streamed.extend(delta.token_ids)
                                attempt_span.set_attribute("num_streamed_tokens", attempt.num_tokens)
                                yield self._delivered(delta)
                            return
                    except AttemptFailed as e:
                        log.warning("request %s: decode on %s failed: %s", req.request_id, worker.worker_id, e)
                        last_error = e
                        num_full += e.overloaded
                        candidates.record(worker.worker_id, e)
                        await self._cancel_unless_refused(worker.worker_id, e, attempt=attempt.number)
                        if not e.retryable:
                            break
                        router.metrics.retries.labels(role="decode").inc()
                    finally:
                        attempt.close()
                        router.policy.release(worker.worker_id, seen)
                raise self._no_decode_left(candidates, last_error, num_full)
            except RouterError as e:
                self._outcome = e.code or "error"
                raise
            except Exception:
                self._outcome = "internal_error"
                raise
            finally:
                for worker_id in sorted(self.holders):  # nothing stays allocated, however the request ended
                    await self._cancel(worker_id)
                self._timer.finish(self._outcome)

    async def _admit_and_plan(self) -> None:
        req, router = self.req, self.router
        refuse_unless_servable(req, router.bus, router.membership, router.config.router_id)
        if router.config.early_refusal:
            refuse_if_late(req, router.policy)
        self.card = router.card(req.model)
        self.plan = await router.planner.plan(req, self.card)
        assert self.span is not None
        self.span.set_attributes(self.plan.attributes())

    def _no_decode_left(self, candidates: Candidates, last_error: AttemptFailed | None, num_full: int) -> RouterError:
        """The error for a request that no decode attempt could finish."""
        if last_error is None:
            return NoWorkerError(f"no live decode worker serves model {self.req.model!r}")
        if num_full and num_full == len(candidates.failed):
            return Overloaded(f"Every decode worker is full ({num_full} tried); retry after the time in the "
                              "Retry-After header.", retry_after_s=WORKERS_FULL_RETRY_AFTER_S)
        if self.req.remaining_s() <= 0:
            return UpstreamTimeout(f"request {self.req.request_id} ran out of time during decode, after "
                                   f"{len(self.streamed or ())} tokens (its timeout, else --request-timeout-s)")
        error_cls = UpstreamTimeout if last_error.timeout else UpstreamError
        return error_cls(f"decode failed after {len(candidates.excluded)} attempt(s): {last_error}")

    def _delivered(self, delta: GenerateDelta) -> GenerateDelta:
        """Count a delta on its way to the client; the last one ends the request, and then nobody holds it."""
        self._timer.on_tokens(len(delta.token_ids))
        if delta.finish_reason is not None:
            self.finished = True
            self.holders.clear()  # decode finished: it freed its work, and its pull released P's KV
            self._outcome = "ok" if delta.finish_reason in ("stop", "length") else delta.finish_reason
        return delta

    async def _prefill(self) -> KVReady | None:
        """KV-ready from some prefill worker (the plan's first), or None when all tries failed (decode then
        prefills locally)."""
        req, router, plan = self.req, self.router, self.plan
        assert plan is not None
        candidates = Candidates(router.config.max_attempts, router.config.prefill_timeout_s)
        while candidates.more():
            worker = plan.prefill if not candidates.excluded else router.policy.choose(
                "prefill", req.model, exclude=candidates.excluded, num_prompt_blocks=plan.num_prompt_blocks,
                matched=plan.matched)
            if worker is None:
                if await candidates.pause(req.remaining_s()):
                    continue
                break
            prefix_kv = await self._prefix_lease(worker.worker_id)
            seen = router.policy.acquire(worker.worker_id)
            self.holders.add(worker.worker_id)  # from the moment it may get the request
            try:
                ready = await prefill_on(router, req, worker.worker_id, prefix_kv)
                router.prefix_reuse.observe(ready)
                if ready.kv_transfer_params is None:
                    self.holders.discard(worker.worker_id)  # the first token ended it: nothing is held
                return ready  # else P holds the prompt's KV until decode pulls it
            except AttemptFailed as e:
                candidates.record(worker.worker_id, e)
                await self._cancel_unless_refused(worker.worker_id, e)
            finally:
                router.policy.release(worker.worker_id, seen)
            if req.remaining_s() <= 0:
                raise UpstreamTimeout(f"request {req.request_id} ran out of time during prefill")
        log.warning("request %s: no prefill worker answered (tried %s); decode will prefill locally",
                    req.request_id, ", ".join(candidates.excluded) or "none")
        self.router.metrics.local_prefills.inc()
        return None

    async def _prefix_lease(self, prefill_worker_id: str) -> KVTransferParams | None:
        """A peer's lease of the prompt's leading blocks for prefill_worker_id (the worker that prefills: a prefill
        worker, or a decode worker prefilling locally) to pull (prefix_reuse.py), or None."""
        plan, reuse = self.plan, self.router.prefix_reuse
        assert plan is not None and self.card is not None and self.span is not None
        source = reuse.source(plan, prefill_worker_id, self.card, len(self.req.prompt_token_ids))
        if source is None:
            return None
        lease = await reuse.lease(self.req, plan, *source, self.card.kv_layout.block_size)
        if lease is not None:
            self.span.set_attributes({"prefix_source_worker_id": lease.worker_id,
                                      "num_prefix_blocks_leased": len(lease.block_ids)})
            log.info("request %s: %s pulls %d cached prefix blocks from %s instead of computing them",
                     self.req.request_id, prefill_worker_id, len(lease.block_ids), lease.worker_id)
        return lease

    def _decode_worker(self, candidates: Candidates) -> Heartbeat | None:
        req, plan, policy = self.req, self.plan, self.router.policy
        assert plan is not None
        ready = self.ready
        if (not candidates.excluded and (ready is None) == (plan.prefill is None)
                and (ready is None or reaches(plan.decode, ready.worker_id))):
            return plan.decode  # as planned (not after a failed prefill: any decode worker may do)
        if ready is None:  # it prefills: its own cache hit counts
            return policy.choose("decode", req.model, exclude=candidates.excluded,
                                 num_prompt_blocks=plan.num_prompt_blocks, matched=plan.matched)
        # one that can pull ready's KV; else any (it recomputes the prompt at once: see peer_paths)
        return (policy.choose_decode_reaching(req.model, ready.worker_id, exclude=candidates.excluded)
                or policy.choose("decode", req.model, exclude=candidates.excluded))

    async def _decode_attempt(self, worker_id: str) -> DecodeAttempt:
        """A decode attempt on worker_id: with P's KV, or, once tokens were streamed, resuming after them, or
        prefilling locally (with a peer's lease of the prompt's cached leading blocks where pulling them pays)."""
        assert self.span is not None
        self.span.set_attribute("decode_worker_id", worker_id)
        resume = tuple(self.streamed) if self.streamed is not None else ()
        if resume:
            self.router.metrics.resumes.inc()
            self.span.set_attribute("num_resumed_tokens", len(resume))
            log.info("request %s: resuming on %s after %d tokens", self.req.request_id, worker_id, len(resume))
        number, self.num_decode_attempts = self.num_decode_attempts, self.num_decode_attempts + 1
        prefix_kv = await self._prefix_lease(worker_id) if self.ready is None and not resume else None
        return DecodeAttempt(self.router, self.req, worker_id, None if resume else self.ready, resume, number,
                             prefix_kv)

    async def _cancel_unless_refused(self, worker_id: str, failure: AttemptFailed, attempt: int | None = None) -> None:
        """After a failed attempt: cancel on the worker if it may have the request (it stalled or failed: stop
        its work, free its KV); one that refused it or never received it holds nothing. attempt: the decode
        attempt that failed (a later one on the same worker is not cancelled with it)."""
        if failure.delivered:
            await self._cancel(worker_id, attempt)
        else:
            self.holders.discard(worker_id)

    async def _cancel(self, worker_id: str, attempt: int | None = None) -> None:
        """Tell worker_id to stop its work on this request (up to decode attempt `attempt`; None: all) and free
        what it holds (once)."""
        if worker_id not in self.holders:
            return
        self.holders.discard(worker_id)
        try:
            await self.router.bus.publish(subjects.CANCEL, CancelRequest(request_id=self.req.request_id,
                                                                          worker_id=worker_id, attempt=attempt),
                                          request_id=self.req.request_id)
        except Exception as e:  # NATS down: leases and deadlines free the rest
            log.warning("request %s: cancel to %s not sent: %s", self.req.request_id, worker_id, e)
