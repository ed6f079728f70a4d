"""The answer to one completion request: the backend's deltas as one OpenAI JSON body or an SSE stream.

It owns these guarantees:
- the backend's generator is always closed, whichever way the request ends (done, error, timeout, client
  gone): closing it is how the backend learns to cancel on the workers;
- a stream is committed (status 200) only once the first delta arrived, so a request that cannot start
  gets a proper 4xx/5xx JSON error instead of a 200 stream with an error inside;
- the generator is iterated from one task only (the request's own), so context variables the backend
  sets (trace spans) stay valid across its yields;
- the request's log line is written once (request_log.RequestLog).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.router.backend import Backend, GenerateDelta, GenerateRequest
from services.router.errors import (InternalError, RouterError, UpstreamError, UpstreamTimeout, error_payload,
                                    internal_error_message, response_for)
from services.router.openai_types import ChatCompletionRequest, CompletionRequest, Format
from services.router.request_log import RequestLog
from pdserve.protocol import Usage

logger = logging.getLogger(__name__)

# The backend enforces GenerateRequest.deadline itself; ours fires a little later, as a safety net only,
# so that the backend's own (more specific) timeout error is the one the client normally sees.
DEADLINE_GRACE_S = 2.0
# Closing the backend's generator sends cancels to workers; bounded so a stuck close cannot pin a task.
CLOSE_TIMEOUT_S = 5.0

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"


class _ClientGone(Exception):
    """The client disconnected; nothing more can be sent."""


class CompletionResponse(Response):
    """Runs one request on the backend while answering it, all in the request's own task.

    Algorithm: start a watcher task that reads `receive` and, if the client disconnects while we still
    work, cancels this task once (plain asyncio cancellation, so the backend's own cleanup awaits are not
    cancelled again). Wait for the first delta under the request's deadline; a failure up to here becomes
    a JSON error with its own status. Then either collect all deltas into one JSON body, or send the SSE
    headers and one event per delta; a failure after the headers becomes an error event and [DONE].
    Whatever happened, close the backend's generator (shielded, bounded) and write the log line.
    """

    def __init__(self, backend: Backend, req: GenerateRequest, body: ChatCompletionRequest | CompletionRequest,
                 fmt: Format, log: RequestLog, request_timeout_s: float, on_end: Callable[[], None]):
        super().__init__(status_code=200)
        self.backend, self.req, self.body, self.fmt, self.log = backend, req, body, fmt, log
        self.request_timeout_s = request_timeout_s
        self._on_end: Callable[[], None] | None = on_end  # called once, when the request is over
        self.created = int(time.time())
        self._working = True  # the watcher only cancels while this is set
        self._disconnected = False
        self._num_tokens = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive, task))
        gen: AsyncIterator[GenerateDelta] | None = None
        try:
            try:
                gen = self.backend.generate(self.req)
            except Exception as e:
                await self._fail(send, e)
                return
            if self.body.stream:
                await self._answer_stream(gen, send)
            else:
                await self._answer_json(gen, send)
        except asyncio.CancelledError:
            self._working = False
            if not self._disconnected or task.uncancel() > 0:
                raise  # cancelled from outside (shutdown): not ours to swallow
            self.log.done(499, num_completion_tokens=self._num_tokens, error="client disconnected")
        except _ClientGone:
            if self._disconnected and task.cancelling():
                task.uncancel()  # the watcher's cancel that something swallowed: the request ends here all the same
            self.log.done(499, num_completion_tokens=self._num_tokens, error="client disconnected")
        finally:
            self._working = False
            watcher.cancel()
            try:
                if gen is not None:
                    await _aclose(gen, self.req.request_id)
            finally:
                self._end()

    def _end(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    async def _watch(self, receive: Receive, task: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._working:
            self._disconnected = True
            task.cancel()

    async def _send(self, send: Send, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._working = False  # once the last byte is out, a disconnect is just the client leaving
        if self._disconnected:
            # The watcher's cancel was lost on the way (a library that swallows it; asyncio.wait_for on 3.11):
            # uvicorn drops writes to a closed connection without a word, so the stream would go on to its end.
            raise _ClientGone
        try:
            await send(message)
        except OSError as e:  # servers on ASGI spec >= 2.4 raise on writes to a closed connection
            raise _ClientGone from e

    async def _fail(self, send: Send, exc: Exception) -> None:
        """Answers with the JSON error for `exc`; only before anything was sent."""
        if not isinstance(exc, RouterError):
            logger.error("request_id=%s unexpected error", self.req.request_id, exc_info=exc)
            exc = InternalError(internal_error_message(self.req.request_id))
        self.log.done(exc.status, num_completion_tokens=self._num_tokens, error=exc.message)
        response = response_for(exc)
        await self._send(send, {"type": "http.response.start", "status": response.status_code,
                                "headers": response.raw_headers})
        await self._send(send, {"type": "http.response.body", "body": response.body})

    async def _fail_stream(self, send: Send, exc: Exception) -> tuple[int, str]:
        """Ends a started stream with an error event (the status line is sent, as OpenAI and vLLM do)."""
        if not isinstance(exc, RouterError):
            logger.error("request_id=%s unexpected error while streaming", self.req.request_id, exc_info=exc)
            exc = InternalError(internal_error_message(self.req.request_id))
        event = _sse(error_payload(exc.status, exc.message, code=exc.code))
        await self._send(send, {"type": "http.response.body", "body": event, "more_body": True})
        return exc.status, exc.message

    async def _next(self, gen: AsyncIterator[GenerateDelta]) -> GenerateDelta:
        """The backend's next delta; UpstreamTimeout past the deadline, UpstreamError if it just ends."""
        loop = asyncio.get_running_loop()
        when = loop.time() + (self.req.deadline - time.time()) + DEADLINE_GRACE_S
        try:
            async with asyncio.timeout_at(when):
                delta = await anext(gen)
        except StopAsyncIteration:
            raise UpstreamError("The worker's token stream ended without a finish reason.") from None
        except TimeoutError as e:
            raise UpstreamTimeout(
                f"The request did not finish within the router's request timeout of {self.request_timeout_s:g}s."
            ) from e
        self._num_tokens += len(delta.token_ids)
        return delta

    def _usage(self, delta: GenerateDelta) -> dict:
        usage = delta.usage or Usage(prompt_tokens=len(self.req.prompt_token_ids),
                                     completion_tokens=self._num_tokens)
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens}

    async def _answer_json(self, gen: AsyncIterator[GenerateDelta], send: Send) -> None:
        texts: list[str] = []
        try:
            delta = await self._next(gen)
            texts.append(delta.text)
            while delta.finish_reason is None:
                delta = await self._next(gen)
                texts.append(delta.text)
        except Exception as e:
            await self._fail(send, e)
            return
        body = orjson.dumps({
            "id": self.req.request_id, "object": self.fmt.object, "created": self.created,
            "model": self.body.model, "choices": [self.fmt.full_choice("".join(texts), delta.finish_reason)],
            "usage": self._usage(delta),
        })
        self.log.done(200, finish_reason=delta.finish_reason, num_completion_tokens=self._num_tokens)
        await self._send(send, {"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
        await self._send(send, {"type": "http.response.body", "body": body})

    async def _answer_stream(self, gen: AsyncIterator[GenerateDelta], send: Send) -> None:
        include_usage = self.body.include_usage()

        async def emit(choices: list[dict], usage: dict | None = None) -> None:
            envelope: dict[str, Any] = {"id": self.req.request_id, "object": self.fmt.chunk_object,
                                        "created": self.created, "model": self.body.model, "choices": choices}
            if include_usage:
                envelope["usage"] = usage
            await self._send(send, {"type": "http.response.body", "body": _sse(envelope), "more_body": True})

        try:
            delta = await self._next(gen)
        except Exception as e:
            await self._fail(send, e)
            return
        await self._send(send, {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        status, error = 200, None
        try:
            for choice in self.fmt.opening():
                await emit([choice])
            while True:
                for choice in self.fmt.delta_choices(delta.text, delta.finish_reason):
                    await emit([choice])
                if delta.finish_reason is not None:
                    break
                delta = await self._next(gen)
            if include_usage:
                await emit([], self._usage(delta))
        except _ClientGone:
            raise
        except Exception as e:
            status, error = await self._fail_stream(send, e)
        self.log.done(status, finish_reason=delta.finish_reason, num_completion_tokens=self._num_tokens,
                      error=error)
        await self._send(send, {"type": "http.response.body", "body": _DONE})


async def _aclose(gen: AsyncIterator[GenerateDelta], request_id: str) -> None:
    """Closes the backend's generator even from a cancelled task, within CLOSE_TIMEOUT_S."""
    aclose = getattr(gen, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
        try:
            await aclose()
        except Exception:
            logger.warning("request_id=%s closing the backend's generator failed", request_id, exc_info=True)
    if scope.cancelled_caught:
        logger.warning("request_id=%s closing the backend's generator took over %gs", request_id, CLOSE_TIMEOUT_S)


def _sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"
