"""Prefill worker: runs prompts to their first token and serves the KV it produced.

Life: config -> tracing -> WorkerRuntime (NATS, engine + transfer endpoint, stats) -> serve prefill requests
and KV releases on this worker's own subjects, and cancels -> heartbeats -> wait for SIGTERM -> goodbye, drain ->
flush spans.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict

from pdserve import subjects, tracing
from pdserve.cancels import EarlyCancels
from pdserve.engine.base import EngineFull, prefix_lease_id
from pdserve.protocol import (CancelRequest, ErrorReply, KVHeld, KVReady, KVRelease, Message, PrefillRequest,
                              PrefixLease, PrefixLeaseRequest)
from pdserve.service import shutdown_event
from pdserve.tracing import SpanKind, setup_tracing, shutdown_tracing
from pdserve.worker import WorkerRuntime
from pdserve.config import WorkerConfig

log = logging.getLogger(__name__)
# A lease is answered only this long before its deadline at the latest: one held past it reaches a router that stopped
# waiting, and nobody would release it before its lease ends.
LEASE_REPLY_MARGIN_S = 0.02


class PrefillHandlers:
    def __init__(self, rt: WorkerRuntime):
        self.rt = rt
        self._tasks: dict[str, asyncio.Task] = {}  # request_id -> the task computing its prefill
        # Such a request is refused on arrival instead of computed and held for a decode worker that never comes.
        self._cancelled_early = EarlyCancels(rt.config.kv_lease_s)
        # request_id -> transfer_id of the KV held for it: a release must name it (a late release of an earlier
        # attempt must not free the KV of a later one, nor can anyone who never saw the KV-ready free it).
        # Entries outlive a lease by little: the engine frees unreleased KV when its lease ends.
        self._held: OrderedDict[str, tuple[str, float]] = OrderedDict()  # request_id -> (transfer_id, lease end)

    async def on_prefill(self, req: PrefillRequest) -> Message:
        # The bus made the router's "prefill request" span current: this span is its child.
        with tracing.span("prefill", kind=SpanKind.SERVER,
                          attributes={"request_id": req.request_id, "worker_id": self.rt.worker_id,
                                      "num_prompt_tokens": len(req.prompt_token_ids)}) as span:
            reply = await self._prefill(req, span)
            if isinstance(reply, ErrorReply):
                tracing.record_error(span, f"{reply.code}: {reply.message}")
            return reply

    async def _prefill(self, req: PrefillRequest, span: tracing.Span) -> Message:
        rt = self.rt
        if self._cancelled_early.take(req.request_id):
            log.info("request %s: cancelled before it arrived; not computed", req.request_id)
            # retryable: should a router still want it, another worker may serve it; this one was told to drop it
            return ErrorReply(code="cancelled", message=f"request {req.request_id} was cancelled", retryable=True)
        refusal = rt.refusal(req.model, req.deadline)
        if refusal is not None:
            return refusal
        rt.num_in_flight += 1
        start = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._tasks[req.request_id] = task
        try:
            result = await rt.engine.prefill(req.request_id, req.prompt_token_ids, req.sampling, rt.config.kv_lease_s,
                                             prefix_kv=req.prefix_kv)
        except EngineFull as e:
            return ErrorReply(code="kv_full", message=f"{rt.worker_id}: {e}")
        except asyncio.CancelledError:
            log.info("request %s: prefill cancelled", req.request_id)
            raise  # nobody waits for the answer any more
        finally:
            rt.num_in_flight -= 1
            if self._tasks.get(req.request_id) is task:
                del self._tasks[req.request_id]
            if req.prefix_kv is not None:  # pulled or given up
                rt.release_prefix_lease(req.request_id, req.prefix_kv)
        rt.num_requests_served += 1
        prefill_ms = (time.monotonic() - start) * 1000
        ready = KVReady(
            request_id=req.request_id, worker_id=rt.worker_id, first_token_id=result.first_token_id,
            first_text=result.first_text, finish_reason=result.finish_reason,
            kv_transfer_params=result.kv_transfer_params, num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=result.num_cached_tokens, num_peer_loaded_tokens=result.num_peer_loaded_tokens,
            num_peer_loaded_bytes=result.num_peer_loaded_bytes, peer_load_ms=result.peer_load_ms,
            prefill_ms=prefill_ms,
            queue_ms=result.queue_ms or 0.0,  # the router's prefill service time is prefill_ms - queue_ms
        )
        num_blocks = len(result.kv_transfer_params.block_ids) if result.kv_transfer_params else 0
        span.set_attributes({"num_cached_tokens": result.num_cached_tokens, "num_blocks": num_blocks,
                             "prefill_ms": prefill_ms})
        if result.queue_ms is not None:
            span.set_attributes({"queue_wait_ms": result.queue_ms, "prefill_compute_ms": prefill_ms - result.queue_ms})
        log.info("request %s: prefilled %d tokens in %.1f ms, %d blocks held for decode", req.request_id,
                 len(req.prompt_token_ids), prefill_ms, num_blocks)
        params = result.kv_transfer_params
        if params is not None:
            self._hold(req.request_id, params.transfer_id, params.lease_expires_at)
        held = KVHeld(request_id=req.request_id, worker_id=rt.worker_id, num_blocks=num_blocks,
                      num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=result.num_cached_tokens,
                      lease_expires_at=params.lease_expires_at if params else None)
        rt.spawn(rt.bus.publish(subjects.KV_HELD, held, request_id=req.request_id))
        return ready

    async def on_prefix_lease(self, msg: PrefixLeaseRequest) -> Message:
        """Hold the leading blocks of a prompt that this worker's cache has for another worker to pull (the
        router asks, and hands the lease to that worker in its prefill request)."""
        rt = self.rt
        if msg.model != rt.engine.card.name:
            return ErrorReply(code="wrong_model", message=f"{rt.worker_id} serves {rt.engine.card.name}, not {msg.model}")
        if time.time() >= msg.deadline:  # the router gave up on it (this worker was slow, or frozen): hold nothing
            log.info("request %s: prefix lease asked for too late; nothing held", msg.request_id)
            return PrefixLease(request_id=msg.request_id, worker_id=rt.worker_id)
        lease_id = prefix_lease_id(msg.request_id)
        if self._held.get(lease_id, ("", 0.0))[1] > time.time():  # an earlier attempt's lease is not released yet
            log.info("request %s: a prefix lease for it is held here already; no second one", msg.request_id)
            return PrefixLease(request_id=msg.request_id, worker_id=rt.worker_id)
        try:  # an engine that runs the prefix's tokens to hold them (vLLM) takes time: never past the deadline
            async with asyncio.timeout(msg.deadline - time.time() - LEASE_REPLY_MARGIN_S):
                params = await rt.engine.lease_prefix(lease_id, msg.block_hashes, rt.config.kv_lease_s,
                                                      msg.prefix_token_ids)
        except TimeoutError:
            params = None
        if time.time() >= msg.deadline - LEASE_REPLY_MARGIN_S:  # the router stops waiting: nobody would release it
            log.info("request %s: cached prefix not held before the lease's deadline; nothing held", msg.request_id)
            await rt.engine.abort(lease_id)
            return PrefixLease(request_id=msg.request_id, worker_id=rt.worker_id)
        if params is not None:
            self._hold(lease_id, params.transfer_id, params.lease_expires_at)
            log.info("request %s: %d cached prefix blocks held for a peer to pull", msg.request_id, len(params.block_ids))
        return PrefixLease(request_id=msg.request_id, worker_id=rt.worker_id, kv_transfer_params=params)

    async def on_cancel(self, msg: CancelRequest) -> None:
        """Stop a prefill still computing, then have the engine free what it holds for the request (its blocks,
        or the KV held for a decode worker): left to finish, the prefill would write KV into blocks another
        request may hold by then and announce KV-ready for a request nobody waits for."""
        if msg.worker_id not in (None, self.rt.worker_id):
            return
        task = self._tasks.get(msg.request_id)
        self._held.pop(msg.request_id, None)
        if task is not None:
            task.cancel()
        else:  # not here yet, or done already (then it never comes again and the entry just ages out)
            self._cancelled_early.remember(msg.request_id)
        await self.rt.engine.abort(msg.request_id)

    def _hold(self, request_id: str, transfer_id: str, lease_expires_at: float) -> None:
        self._held.pop(request_id, None)
        self._held[request_id] = (transfer_id, lease_expires_at)
        now = time.time()
        while self._held and next(iter(self._held.values()))[1] < now - 1.0:
            self._held.popitem(last=False)

    async def on_release(self, msg: KVRelease) -> None:
        transfer_id, _ = self._held.get(msg.request_id, ("", 0.0))
        if not transfer_id or not hmac.compare_digest(transfer_id.encode(), msg.transfer_id.encode()):
            log.info("request %s: release of a transfer this worker does not hold for it; ignored", msg.request_id)
            return
        del self._held[msg.request_id]
        freed = await self.rt.engine.release_kv(msg.request_id)
        log.info("request %s: decode %s the KV; blocks %s", msg.request_id,
                 "pulled" if msg.ok else "gave up", "freed" if freed else "were already free")


async def serve(config: WorkerConfig) -> None:
    stop = shutdown_event()
    setup_tracing("prefill-worker")
    try:
        async with WorkerRuntime(config) as rt:
            handlers = PrefillHandlers(rt)
            await rt.bus.serve(subjects.prefill_request(rt.worker_id), PrefillRequest, handlers.on_prefill)
            await rt.bus.serve(subjects.prefix_lease(rt.worker_id), PrefixLeaseRequest, handlers.on_prefix_lease)
            await rt.bus.subscribe(subjects.kv_release(rt.worker_id), KVRelease, handlers.on_release)
            await rt.bus.subscribe(subjects.CANCEL, CancelRequest, handlers.on_cancel)
            await rt.announce()
            await stop.wait()
    finally:
        shutdown_tracing()
