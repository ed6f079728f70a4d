"""Decode worker: pulls a request's KV from its prefill worker, decodes, streams token chunks.

Life: config -> tracing -> WorkerRuntime (NATS, engine + transfer endpoint, stats) -> serve decode requests on
this worker's own subject, and cancels -> heartbeats -> wait for SIGTERM -> goodbye, drain -> flush spans.
A decode request is accepted at once (DecodeAccepted) and runs in its own task; chunks go to the router's
stream subject with sequence numbers, the last one with finish_reason and usage. The engine's stream tells
when the prompt's KV is loaded (a KVLoadReport among the tokens): then the prefill worker may free its copy.
After this worker's NATS connection came back, the last chunks of its recent streams are published again
(recent_chunks.py): a last chunk lost with a dying NATS node would otherwise leave the router waiting.
A later attempt of a request on this worker (the router resumes here after chunks were lost in NATS) replaces
the earlier one once that one has stopped; a cancel of the earlier attempt does not stop the later.
A pull that could not connect to the prefill worker marks it unreachable (pdserve.peer_paths); a request whose
KV sits on a worker marked so is not pulled: its prompt (and first token) is recomputed here at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pdserve import subjects, tracing
from pdserve.cancels import EarlyCancels
from pdserve.config import WorkerConfig
from pdserve.engine.base import EngineFull, KVLoadReport
from pdserve.protocol import (CancelRequest, DecodeAccepted, DecodeRequest, ErrorReply, KVRelease, KVTransferDone,
                              Message, TokenChunk, Usage)
from pdserve.service import shutdown_event
from pdserve.tracing import SpanKind, setup_tracing, shutdown_tracing
from pdserve.worker import WorkerRuntime
from services.decode_worker.recent_chunks import RecentChunks

log = logging.getLogger(__name__)

# How long a later attempt waits for the earlier one it replaces to stop and free what it holds.
REPLACE_TIMEOUT_S = 5.0
# How long after its reconnect a worker publishes its recent chunks again.
REPUBLISH_DELAY_S = 1.0


class DecodeHandlers:
    def __init__(self, rt: WorkerRuntime):
        self.rt = rt
        self._requests: dict[str, DecodeRequest] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._attempts: dict[str, int] = {}  # request id -> the router's attempt its task runs
        self.recent = RecentChunks()
        # A request whose cancel came first is refused on arrival, not decoded to max_tokens for nobody.
        self._cancelled_early = EarlyCancels(rt.config.kv_lease_s)

    async def on_decode(self, req: DecodeRequest) -> Message:
        rt = self.rt
        if self._cancelled_early.take(req.request_id, req.attempt):
            log.info("request %s: cancelled before it arrived; not decoded", req.request_id)
            if req.kv_transfer_params:  # the prefill worker may free its copy now, not at lease end
                self._send_release(req, ok=False)
            # retryable: a router that still wants it (it resent after a NATS blip) may try another worker
            return ErrorReply(code="cancelled", message=f"request {req.request_id} was cancelled", retryable=True)
        if req.request_id in self._tasks and not await self._replace(req):
            return ErrorReply(code="duplicate", message=f"{rt.worker_id} already decodes {req.request_id} "
                              f"(attempt {self._attempts.get(req.request_id, 0)})")
        refusal = rt.refusal(req.model, req.deadline)
        if refusal is not None:
            return refusal
        rt.num_in_flight += 1
        self._requests[req.request_id] = req
        task = asyncio.create_task(self._run(req), name=f"decode-{req.request_id}")
        self._tasks[req.request_id] = task
        self._attempts[req.request_id] = req.attempt
        task.add_done_callback(lambda _: self._ended(req, task))
        return DecodeAccepted(request_id=req.request_id, worker_id=rt.worker_id)

    async def _replace(self, req: DecodeRequest) -> bool:
        """A later attempt of a request running here: stop the earlier one (it frees its KV as it ends, the engine
        aborts it) and wait for that, so that the two never share the request id in the engine. False when req
        is not later, or the earlier one did not stop in time."""
        running, attempt = self._tasks[req.request_id], self._attempts.get(req.request_id, 0)
        if req.attempt <= attempt:
            return False
        log.info("request %s: attempt %d replaces attempt %d here (the router resumes after lost chunks)",
                 req.request_id, req.attempt, attempt)
        running.cancel()
        await asyncio.wait({running}, timeout=REPLACE_TIMEOUT_S)
        await self.rt.engine.abort(req.request_id)
        return req.request_id not in self._tasks

    def _ended(self, req: DecodeRequest, task: asyncio.Task) -> None:
        """Undo what accepting the request counted, however its task ended: a task cancelled before its first
        step (a cancel right behind the request, as after a NATS outage) never runs any code of its own."""
        self.rt.num_in_flight -= 1
        if self._tasks.get(req.request_id) is task:
            del self._tasks[req.request_id]
            del self._attempts[req.request_id]
        if self._requests.get(req.request_id) is req:
            del self._requests[req.request_id]
            if req.kv_transfer_params:  # never loaded: let prefill free its copy now, not at lease end
                self._send_release(req, ok=False)
        if not task.cancelled() and task.exception() is not None:
            log.warning("request %s: decode ended with %r", req.request_id, task.exception())

    async def _run(self, req: DecodeRequest) -> None:
        # Started from on_decode, this task carries the router's "decode request" context: the span is its child.
        params = req.kv_transfer_params
        attributes = {"request_id": req.request_id, "worker_id": self.rt.worker_id,
                      "num_prompt_tokens": len(req.prompt_token_ids), "num_resumed_tokens": len(req.resume_token_ids),
                      "prefill_worker_id": params.worker_id if params else "",
                      "num_blocks": len(params.block_ids) if params else 0}
        with tracing.span("decode", kind=SpanKind.SERVER, attributes=attributes) as span:
            await self._decode(req, span)

    def _skip_pull(self, req: DecodeRequest, span: tracing.Span) -> bool:
        """Whether req's KV sits on a prefill worker this worker cannot reach (then it is not pulled: the prefill
        worker may free it now)."""
        params = req.kv_transfer_params
        pulls = params is not None and req.first_token_id is not None and not req.resume_token_ids
        why = self.rt.peer_paths.why_unreachable(params.worker_id) if pulls else None
        if why is None or self._requests.get(req.request_id) is not req:
            return False
        del self._requests[req.request_id]
        self._send_release(req, ok=False)
        span.set_attributes({"kv_recomputed": True, "kv_error": f"unreachable: {why}"})
        log.info("request %s: prefill worker %s is marked unreachable from here (%s); recomputing the prompt "
                 "without trying to pull", req.request_id, params.worker_id, why)
        return True

    async def _decode(self, req: DecodeRequest, span: tracing.Span) -> None:
        """KV load and generation; ttft_ms: to this worker's first output; tpot_ms: mean time per token after it."""
        rt = self.rt
        seq = 0
        first_token_id, params, resume = req.first_token_id, req.kv_transfer_params, req.resume_token_ids
        if self._skip_pull(req, span):  # the client has the first token: go on after it, as on a resume
            first_token_id, params, resume = None, None, (*resume, req.first_token_id)
        prefix_kv = req.prefix_kv  # prefilling locally: a peer's lease of the prompt's leading blocks, until released
        num_tokens = len(req.resume_token_ids) + (1 if req.first_token_id is not None else 0)
        started = time.monotonic()
        first_at = last_at = 0.0
        num_first = num_generated = 0
        try:
            # aclosing: the engine frees the request's KV as soon as this ends, whichever way (a failed publish too)
            async with contextlib.aclosing(rt.engine.generate(
                    req.request_id, req.prompt_token_ids, req.sampling, first_token_id, params, resume,
                    prefix_kv=prefix_kv)) as outputs:
                async for out in outputs:
                    if isinstance(out, KVLoadReport):  # not a token: nothing to stream, nothing timed
                        self._kv_loaded(req, out)
                        continue
                    last_at = time.monotonic()
                    if num_generated == 0:
                        first_at, num_first = last_at, len(out.token_ids)
                        span.set_attribute("ttft_ms", (first_at - started) * 1000)
                        if prefix_kv is not None:  # pulled or given up by now
                            rt.release_prefix_lease(req.request_id, prefix_kv)
                            prefix_kv = None
                    num_generated += len(out.token_ids)
                    num_tokens += len(out.token_ids)
                    usage = None
                    if out.finish_reason is not None:
                        usage = Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=num_tokens)
                    chunk = TokenChunk(request_id=req.request_id, worker_id=rt.worker_id, stream_token=req.stream_token,
                                       seq=seq, token_ids=out.token_ids, text=out.text,
                                       finish_reason=out.finish_reason, usage=usage)
                    await self._publish(req, chunk)
                    seq += 1
            rt.num_requests_served += 1
            span.set_attributes({"num_tokens": num_tokens, "num_chunks": seq})
            if num_generated > num_first:
                span.set_attribute("tpot_ms", (last_at - first_at) * 1000 / (num_generated - num_first))
        except asyncio.CancelledError:
            log.info("request %s: cancelled after %d chunks", req.request_id, seq)
            self.recent.end(req.request_id, req.stream_token)
            raise
        except EngineFull as e:
            tracing.record_error(span, str(e))
            await self._fail(req, seq, f"{rt.worker_id}: {e}", code="kv_full")
        except Exception as e:
            log.exception("request %s: decode failed", req.request_id)
            span.record_exception(e)
            tracing.record_error(span, f"{type(e).__name__}: {e}")
            await self._fail(req, seq, f"decode on {rt.worker_id} failed: {type(e).__name__}: {e}")
        finally:
            if prefix_kv is not None:  # ended before its first output
                rt.release_prefix_lease(req.request_id, prefix_kv)

    async def _fail(self, req: DecodeRequest, seq: int, error: str, *, code: str | None = None) -> None:
        chunk = TokenChunk(request_id=req.request_id, worker_id=self.rt.worker_id, stream_token=req.stream_token,
                           seq=seq, finish_reason="error", error=error, error_code=code)
        await self._publish(req, chunk)

    async def _publish(self, req: DecodeRequest, chunk: TokenChunk) -> None:
        self.recent.add(req.stream_subject, chunk)  # first: a publish that fails is published again later
        await self.rt.bus.publish(req.stream_subject, chunk, request_id=req.request_id)

    def on_reconnect(self) -> None:
        """After this worker's NATS connection came back: the last chunks of its recent streams, once more."""
        chunks = self.recent.to_publish_again()
        if chunks:
            log.info("%s: reconnected to NATS: publishing the last %d chunks of %d recent streams again (routers "
                     "drop what they have)", self.rt.worker_id, len(chunks), len(self.recent))
            self.rt.spawn(self._publish_again(chunks))

    async def _publish_again(self, chunks: list[tuple[str, TokenChunk]]) -> None:
        # After a NATS server restart the routers reconnect too, at about the same time: give them a moment to
        # subscribe again, or the chunks would be lost a second time.
        await asyncio.sleep(REPUBLISH_DELAY_S)
        for subject, chunk in chunks:
            try:
                await self.rt.bus.publish(subject, chunk, request_id=chunk.request_id)
            except Exception as e:  # NATS gone again: the next reconnect tries again
                log.warning("%s: chunks not published again: %s", self.rt.worker_id, e)
                return

    def _kv_loaded(self, req: DecodeRequest, report: KVLoadReport) -> None:
        """The prompt's KV is here (pulled or recomputed): the prefill worker may free its copy now."""
        request_id = req.request_id
        if self._requests.get(request_id) is not req or req.kv_transfer_params is None:
            return
        del self._requests[request_id]
        params = req.kv_transfer_params
        if report.unreachable:
            self.rt.peer_paths.mark(params.worker_id, params.address, report.error or "no connection")
        self._send_release(req, ok=not report.recomputed)
        done = KVTransferDone(request_id=request_id, prefill_worker_id=params.worker_id, decode_worker_id=self.rt.worker_id,
                              ok=not report.recomputed, num_blocks=report.num_blocks, num_bytes=report.num_bytes,
                              transfer_ms=report.transfer_ms, error=report.error)
        self.rt.spawn(self.rt.bus.publish(subjects.KV_TRANSFER_DONE, done, request_id=request_id))
        if report.recomputed:
            tracing.current_span().set_attributes({"kv_recomputed": True, "kv_error": report.error or ""})
        if not report.recomputed and not report.transport:
            log.info("request %s: its prompt KV was all in this engine's prefix cache; nothing pulled", request_id)
        elif not report.recomputed:
            self.rt.metrics.kv_transfer_seconds.labels(transport=report.transport or "tcp").observe(
                report.transfer_ms / 1000)
            tracing.current_span().set_attribute("kv_transport", report.transport)
            log.info("request %s: pulled %d KV blocks (%d bytes) from %s over %s in %.2f ms", request_id,
                     report.num_blocks, report.num_bytes, params.worker_id, report.transport or "tcp", report.transfer_ms)

    def _send_release(self, req: DecodeRequest, *, ok: bool) -> None:
        params = req.kv_transfer_params
        assert params is not None
        release = KVRelease(request_id=req.request_id, transfer_id=params.transfer_id, ok=ok)
        self.rt.spawn(self.rt.bus.publish(subjects.kv_release(params.worker_id), release, request_id=req.request_id))

    async def on_cancel(self, msg: CancelRequest) -> None:
        """Stop the request's decode task (it frees what it holds as it ends), then have the engine abort it."""
        if msg.worker_id not in (None, self.rt.worker_id):
            return
        task = self._tasks.get(msg.request_id)
        if task and msg.attempt is not None and self._attempts.get(msg.request_id, 0) > msg.attempt:
            return  # the attempt it cancels was replaced here by a later one, which goes on
        if task:
            task.cancel()
        else:  # not here yet (or over already: then the entry just ages out)
            self._cancelled_early.remember(msg.request_id, msg.attempt)
        await self.rt.engine.abort(msg.request_id)


async def serve(config: WorkerConfig) -> None:
    stop = shutdown_event()
    setup_tracing("decode-worker")
    try:
        async with WorkerRuntime(config) as rt:
            handlers = DecodeHandlers(rt)
            rt.bus.on_reconnect.append(handlers.on_reconnect)
            await rt.bus.serve(subjects.decode_request(rt.worker_id), DecodeRequest, handlers.on_decode)
            await rt.bus.subscribe(subjects.CANCEL, CancelRequest, handlers.on_cancel)
            await rt.announce()
            await stop.wait()
    finally:
        shutdown_tracing()
