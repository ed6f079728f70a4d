"""One try of one role on one worker: a prefill attempt (its KV-ready answer) or a decode attempt (its token
chunks, in order, as deltas), and the workers of a role a request may still try (Candidates).

An attempt raises AttemptFailed when the worker cannot or did not do the work; `delivered` then says whether the
worker may hold something of the request (it got the request: a cancel must follow), which the request that
owns the attempt (router_request.RouterRequest) acts on.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve import subjects, tracing
from pdserve.bus import BusError, BusTimeout, NoResponders, RemoteError
from pdserve.protocol import DecodeAccepted, DecodeRequest, KVReady, KVTransferParams, PrefillRequest, TokenChunk
from pdserve.tracing import SpanKind
from services.router.backend import GenerateDelta, GenerateRequest
from services.router.errors import UpstreamError
from services.router.token_streams import RECONNECTED
from services.router.shared import Shared

log = logging.getLogger(__name__)

# ErrorReply codes of a worker that is full (queue bound, KV memory): try another, else 429.
OVERLOAD_CODES = frozenset({"overloaded", "kv_full"})
# How long a request waits before it tries again workers that were not listening (see Candidates).
NOT_LISTENING_PAUSE_S = 0.25

_NOTHING = object()


class AttemptFailed(Exception):
    """An attempt failed. retryable: another worker may do better (after streamed tokens: by resuming after
    them), not when the worker refused for good; overloaded: it refused because it is full; not_listening:
    nobody received the request (NoResponders); delivered: the worker got the request and may hold work;
    lost_messages: the worker is alive and working, but NATS lost some of its chunks (a node of a cluster died,
    the router reconnected): it may be tried again (a resume there replaces the attempt)."""

    def __init__(self, message: str, *, retryable: bool = True, timeout: bool = False, overloaded: bool = False,
                 not_listening: bool = False, delivered: bool = True, lost_messages: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        self.overloaded = overloaded
        self.not_listening = not_listening
        self.delivered = delivered
        self.lost_messages = lost_messages

    @classmethod
    def of(cls, e: BusError) -> "AttemptFailed":
        """A request over the bus that failed: refused (RemoteError), nobody listening, or no answer in time."""
        if isinstance(e, RemoteError):
            return cls(f"refused: {e.reply.message}", retryable=e.reply.retryable,
                       overloaded=e.reply.code in OVERLOAD_CODES, delivered=False)
        not_listening = isinstance(e, NoResponders)
        return cls(str(e), timeout=isinstance(e, BusTimeout), not_listening=not_listening,
                   delivered=not not_listening)


class Candidates:
    """The workers of one role a request may still try.

    A worker that failed the request is not tried again, and at most max_attempts may fail. A worker whose
    chunks were lost on the way (AttemptFailed.lost_messages) counts as a failed attempt but may be tried again:
    it works, NATS lost its messages (with one decode worker, it is the only one that can resume the stream).
    A worker that was not listening (NoResponders: nobody subscribes to its subject right now) costs no attempt: it died (NATS
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
        self.num_lost = 0  # attempts whose messages were lost (their workers stay candidates)
        self.waited_s = 0.0

    @property
    def excluded(self) -> list[str]:
        return self.failed + self.not_listening

    def more(self) -> bool:
        return len(self.failed) + self.num_lost < self.max_attempts

    def record(self, worker_id: str, failure: AttemptFailed) -> None:
        if failure.lost_messages:
            self.num_lost += 1
        else:
            (self.not_listening if failure.not_listening else self.failed).append(worker_id)

    async def pause(self, remaining_s: float) -> bool:
        """Called when no other worker is left: wait, then let the workers that were not listening be tried
        again; False (at once) when there is none to wait for or no time left."""
        if not self.not_listening or self.waited_s + NOT_LISTENING_PAUSE_S > min(self.budget_s, remaining_s):
            return False
        await asyncio.sleep(NOT_LISTENING_PAUSE_S)
        self.waited_s += NOT_LISTENING_PAUSE_S
        self.not_listening.clear()
        return True


async def prefill_on(router: Shared, req: GenerateRequest, worker_id: str,
                     prefix_kv: KVTransferParams | None = None) -> KVReady:
    """Ask worker_id to prefill (deadline prefill_timeout_s, cut short when the worker is gone), under a client
    span. UpstreamError when it refused for good; AttemptFailed when another worker may do better."""
    timeout_s = min(router.config.prefill_timeout_s, req.remaining_s())
    msg = PrefillRequest(request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
                         sampling=req.sampling, deadline=time.time() + timeout_s, prefix_kv=prefix_kv)
    with tracing.span("prefill request", kind=SpanKind.CLIENT,
                      attributes={"request_id": req.request_id, "worker_id": worker_id}) as span:
        try:
            ready = await router.watch.unless_gone(worker_id, router.bus.request(
                subjects.prefill_request(worker_id), msg, KVReady, timeout_s=timeout_s, request_id=req.request_id))
        except BusError as e:
            tracing.record_error(span, str(e))
            failure = AttemptFailed.of(e)
            if isinstance(e, RemoteError):
                log.warning("request %s: prefill worker %s refused: %s", req.request_id, worker_id, e)
                if not failure.retryable:
                    raise UpstreamError(f"prefill worker {worker_id}: {e.reply.message}") from e
            elif failure.not_listening:
                log.warning("request %s: prefill worker %s is not listening (%s); trying elsewhere",
                            req.request_id, worker_id, e)
            else:
                log.warning("request %s: prefill worker %s failed (%s); trying elsewhere", req.request_id, worker_id, e)
            if not isinstance(e, RemoteError):
                router.metrics.retries.labels(role="prefill").inc()
            raise failure from e
        params = ready.kv_transfer_params
        span.set_attributes({"num_prompt_tokens": ready.num_prompt_tokens, "prefill_ms": ready.prefill_ms,
                             "num_cached_tokens": ready.num_cached_tokens,
                             "num_blocks": len(params.block_ids) if params else 0})
    log.info("request %s: prefill on %s: %d prompt tokens in %.1f ms", req.request_id, worker_id,
             ready.num_prompt_tokens, ready.prefill_ms)
    router.metrics.prompt_tokens.inc(ready.num_prompt_tokens)
    router.metrics.cached_prompt_tokens.inc(ready.num_cached_tokens)
    router.policy.prefill_time.observe((ready.prefill_ms - ready.queue_ms) / 1000)
    return ready


def _seen_before(chunk: object, num_chunks: int) -> bool:
    """A chunk this attempt already streamed (a worker publishes its last chunks again after a reconnect)."""
    return isinstance(chunk, TokenChunk) and chunk.seq < num_chunks


class DecodeAttempt:
    """One decode attempt on one worker: its token stream is opened before the request is sent (no chunk can
    come before its queue), then `next_delta()` returns the worker's chunks in order as deltas.

    Chunks must come in sequence with no gap; a missing one, an error chunk, a worker gone, or no chunk for
    stream_idle_timeout_s fails the attempt; one already streamed (published again by a worker after it
    reconnected to NATS, see services/decode_worker/recent_chunks.py) is dropped. After the router's NATS connection came back, chunks may have
    been lost, the last one too: the next one is then awaited only as long as a silent worker takes to be
    declared gone. Chunks already queued (the router fell behind the worker) go out as one delta: one SSE
    event and one socket write instead of one per token, which is where a loaded router's time goes.
    """

    def __init__(self, router: Shared, req: GenerateRequest, worker_id: str, ready: KVReady | None,
                 resume_token_ids: tuple[int, ...], number: int = 0, prefix_kv: KVTransferParams | None = None):
        self.router = router
        self.req = req
        self.worker_id = worker_id
        self.prefix_kv = prefix_kv  # it prefills locally: a peer's lease of the prompt's leading blocks
        self.number = number  # of the request's decode attempts, counting from 0 (DecodeRequest.attempt)
        self.ready = ready
        self.resume_token_ids = resume_token_ids
        self.num_chunks = 0
        self.num_tokens = 0  # streamed by this attempt
        self._stream = router.streams.open(req.request_id, worker_id)
        self._held: object = _NOTHING  # a chunk taken while coalescing, not yet checked
        self._idle_s = router.config.stream_idle_timeout_s
        self._why = ""

    def close(self) -> None:
        self.router.streams.close(self._stream)

    async def send(self) -> None:
        req, ready = self.req, self.ready
        msg = DecodeRequest(
            request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling, first_token_id=ready.first_token_id if ready else None,
            kv_transfer_params=ready.kv_transfer_params if ready else None,
            stream_subject=self.router.streams.subject(req.request_id), stream_token=self._stream.token,
            deadline=req.deadline, resume_token_ids=self.resume_token_ids, attempt=self.number,
            prefix_kv=self.prefix_kv,
        )
        timeout_s = min(self.router.config.decode_accept_timeout_s, req.remaining_s())
        try:
            await self.router.watch.unless_gone(self.worker_id, self.router.bus.request(
                subjects.decode_request(self.worker_id), msg, DecodeAccepted, timeout_s=timeout_s,
                request_id=req.request_id))
        except BusError as e:
            raise AttemptFailed.of(e) from e

    async def next_delta(self) -> GenerateDelta:
        chunks = self._stream.chunks
        while True:
            if self._held is not _NOTHING:
                chunk, self._held = self._held, _NOTHING
            else:
                chunk = await self._next_chunk(min(self._idle_s, self.req.remaining_s()))
            if _seen_before(chunk, self.num_chunks):
                continue  # published again after the worker reconnected to NATS: already streamed
            if chunk is not RECONNECTED:
                break
            # What the worker published while we were away is lost; if that was its last chunk, nothing more
            # comes. Wait only as long as a silent worker takes to be declared gone, then resume.
            self._idle_s = min(self._idle_s, self.router.watch.silence_allowance_s(self.worker_id))
            self._why = " after the router or the worker reconnected to NATS (chunks lost meanwhile)"
        self._idle_s, self._why = self.router.config.stream_idle_timeout_s, ""
        self._check(chunk)
        texts, token_ids = [chunk.text], list(chunk.token_ids)
        while chunk.finish_reason is None and not chunks.empty():
            following = chunks.get_nowait()
            if _seen_before(following, self.num_chunks):
                continue
            if (following is None or following is RECONNECTED or following.error
                    or following.seq != self.num_chunks):
                self._held = following
                break
            chunk = following
            self.num_chunks += 1
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
        self.num_tokens += len(token_ids)
        return GenerateDelta("".join(texts), tuple(token_ids), chunk.finish_reason, chunk.usage)

    def _check(self, chunk: TokenChunk | None) -> None:
        """Raise AttemptFailed unless chunk is the next good one (None: the worker is gone)."""
        if chunk is None:
            raise AttemptFailed(f"decode worker {self.worker_id} is gone (goodbye or missed heartbeats)")
        if chunk.seq != self.num_chunks:
            # Resuming from the tokens the client has is right whatever was lost in between.
            raise AttemptFailed(f"chunk {chunk.seq} arrived, expected {self.num_chunks}; tokens were lost",
                                lost_messages=True)
        if chunk.error:
            raise AttemptFailed(chunk.error, overloaded=chunk.error_code in OVERLOAD_CODES)
        self.num_chunks += 1

    async def _next_chunk(self, timeout_s: float) -> object:
        chunks = self._stream.chunks
        if not chunks.empty():
            return chunks.get_nowait()
        # A timer only when there is something to wait for. Not asyncio.wait_for: on Python 3.11 it returns the
        # chunk and drops the cancel when both come in one turn of the loop (a client that left then got its
        # stream decoded to the end for nobody; seen with 150 streams dropped at once).
        try:
            async with asyncio.timeout(max(timeout_s, 0.001)):
                return await chunks.get()
        except TimeoutError:
            if self.req.remaining_s() <= 0:  # the request's own deadline, not the worker's silence: no retry
                raise AttemptFailed("the request's deadline passed while it decoded", timeout=True,
                                    retryable=False) from None
            raise AttemptFailed(f"no tokens for {timeout_s:.1f}s{self._why}", timeout=True,
                                lost_messages=bool(self._why)) from None
