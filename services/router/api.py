"""The router's OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

The HTTP layer validates, templates, tokenizes and enforces the context limit, then hands one
`GenerateRequest` to the `Backend` (the orchestrator in production, a stand-in in tests) and turns the
deltas it yields into an OpenAI JSON body or SSE stream. It owns these guarantees:
- the backend's generator is always closed, whichever way the request ends (done, error, timeout, client
  gone): closing it is how the backend learns to cancel on the workers;
- a stream is committed (status 200) only once the first delta arrived, so a request that cannot start
  gets a proper 4xx/5xx JSON error instead of a 200 stream with an error inside;
- the generator is iterated from one task only (the request's own), so context variables the backend
  sets (trace spans) stay valid across its yields;
- every response carries X-Request-Id, and every request is one INFO log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import anyio
import orjson
from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve import tracing
from pdserve.protocol import ModelCard, SamplingParams, Usage
from pdserve.tokenizer import Tokenizer
from services.router.backend import (Backend, BackendError, GenerateDelta, GenerateRequest, NoWorkerError,
                                     UpstreamError, UpstreamTimeout)
from services.router.auth import ApiKeys
from services.router.errors import (REQUEST_ID_HEADER, APIError, ContextLengthExceeded, InvalidRequest,
                                    ModelNotFound, PayloadTooLarge, TooManyRequests, Unauthorized, error_payload,
                                    install_error_handlers, internal_error_message, response_for)
from services.router.openai_types import SEVERAL_PROMPTS, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

# vLLM defaults max_tokens to all the context left after the prompt; we cap that default so a request
# without max_tokens ends in bounded time on a CPU engine. An explicit max_tokens is honoured up to the limit.
DEFAULT_MAX_TOKENS = 256
# The backend enforces GenerateRequest.deadline itself; ours fires a little later, as a safety net only,
# so that the backend's own (more specific) timeout error is the one the client normally sees.
DEADLINE_GRACE_S = 2.0
# Closing the backend's generator sends cancels to workers; bounded so a stuck close cannot pin a task.
CLOSE_TIMEOUT_S = 5.0
# Retry-After of a 429 for the in-flight cap: at the cap, requests end all the time (512 requests of 30 s
# each free a slot every 60 ms), so a second is plenty; clients back off further on repeated 429s.
INFLIGHT_RETRY_AFTER_S = 1.0

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ID_PREFIXES = {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"


def create_app(
    backend: Backend,
    *,
    served_model_names: Mapping[str, str] | None = None,
    request_timeout_s: float = 600.0,
    max_body_bytes: int = 4 * 1024 * 1024,
    max_inflight: int = 512,
    api_keys: ApiKeys | None = None,
) -> FastAPI:
    """The router's FastAPI app over `backend`.

    served_model_names: extra public model names, alias -> backend model name (ModelCard.name), like vLLM's
    --served-model-name; the backend's own names stay valid. request_timeout_s: each request's deadline.
    max_body_bytes: a larger request body gets 413 before any parsing. max_inflight: completions served at
    once; one more gets 429 with Retry-After at once (the bounded queue in front of the workers' own).
    api_keys: when given, /v1 paths need `Authorization: Bearer <key>` (401 otherwise).
    """
    assert request_timeout_s > 0 and max_body_bytes > 0 and max_inflight > 0
    models = _Models(backend, dict(served_model_names or {}))
    inflight = _InflightLimit(max_inflight)
    app = FastAPI(title="pdserve router", description="OpenAI-compatible API of pdserve", version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(_RequestContext, max_body_bytes=max_body_bytes, api_keys=api_keys)

    def serve(request: Request, body: ChatCompletionRequest | CompletionRequest, fmt: _Format) -> Response:
        request_id = _request_id_of(request)
        client_request_id = getattr(request.state, "client_request_id", None)
        log = _RequestLog(request_id, body.model, bool(body.stream), client_request_id)
        if not inflight.acquire():
            busy = TooManyRequests(f"The server is serving its limit of {inflight.limit} requests at once; retry "
                                   "after the time in the Retry-After header.", retry_after_s=INFLIGHT_RETRY_AFTER_S)
            log.done(busy.status, error=busy.message)
            return response_for(busy)
        try:
            generate_request = _build_request(request, request_id, client_request_id, body, fmt, models, backend,
                                              request_timeout_s)
        except (APIError, BackendError) as e:
            inflight.release()
            log.done(e.status, error=e.message)
            return response_for(e)
        except Exception:
            inflight.release()
            logger.exception("request_id=%s unexpected error while preparing the request", request_id)
            log.done(500, error="internal_error")
            return response_for(_InternalError(internal_error_message(request_id)))
        log.num_prompt_tokens = len(generate_request.prompt_token_ids)
        log.max_tokens = generate_request.sampling.max_tokens
        return _Generation(backend, generate_request, body, fmt, log, request_timeout_s, on_end=inflight.release)

    @app.post("/v1/chat/completions", response_model=None, summary="Chat completion (OpenAI)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return serve(request, body, _CHAT)

    @app.post("/v1/completions", response_model=None, summary="Text completion (OpenAI)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return serve(request, body, _COMPLETION)

    @app.get("/v1/models", response_model=None, summary="Models served by live workers")
    async def list_models() -> Response:
        return _json({"object": "list", "data": models.entries()})

    @app.get("/v1/models/{model:path}", response_model=None, summary="One served model")
    async def get_model(model: str) -> Response:
        for entry in models.entries():
            if entry["id"] == model:
                return _json(entry)
        raise models.not_found(model)

    @app.get("/health", response_model=None, summary="Router and worker health")
    async def health() -> Response:
        try:
            report = backend.health()
        except Exception:
            logger.exception("health check failed")
            report = {"status": "error", "error": "health check failed; the router's log has the details"}
        # 200 while requests can be served (also "degraded" with a reason, e.g. no KV broker), else 503
        return _json(report, 200 if report.get("status") == "ok" or report.get("serving") else 503)

    return app


# ------------------------------------------------------------------------------------ request building


class _Models:
    """The public model names: the backend's live models plus their configured aliases."""

    def __init__(self, backend: Backend, aliases: dict[str, str]):
        self.backend = backend
        self.aliases = aliases
        self.created = int(time.time())

    def _public(self) -> dict[str, ModelCard]:
        cards = {card.name: card for card in self.backend.models()}
        names = dict(cards)
        names.update({alias: cards[target] for alias, target in self.aliases.items() if target in cards})
        return names

    def entries(self) -> list[dict]:
        return [
            {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve",
             "max_model_len": card.max_model_len}
            for name, card in sorted(self._public().items())
        ]

    def not_found(self, name: str) -> ModelNotFound:
        served = ", ".join(sorted(self._public())) or "none"
        return ModelNotFound(f"The model `{name}` does not exist. Served models: {served}.", param="model")

    def resolve(self, name: str) -> ModelCard:
        names = self._public()
        if name in names:
            return names[name]
        if not names:
            # Workers register at runtime: while none is up, 503 tells clients to retry, 404 would not.
            raise NoWorkerError(f"No live worker serves any model yet (requested `{name}`); "
                                "start prefill and decode workers or wait for them to register.")
        raise self.not_found(name)


@dataclass(frozen=True)
class _Format:
    """What differs between chat and text completions on the wire."""

    object: str
    chunk_object: str
    prompt_word: str  # names the prompt in error messages and in `param`
    chat: bool

    def opening(self) -> list[dict]:
        return [_choice(delta={"role": "assistant", "content": ""})] if self.chat else []

    def delta_choices(self, text: str, finish_reason: str | None) -> list[dict]:
        if not self.chat:
            return [_choice(text=text, finish_reason=finish_reason)] if text or finish_reason else []
        choices = [_choice(delta={"content": text})] if text else []
        if finish_reason is not None:
            choices.append(_choice(delta={}, finish_reason=finish_reason))
        return choices

    def full_choice(self, text: str, finish_reason: str) -> dict:
        if self.chat:
            return _choice(message={"role": "assistant", "content": text}, finish_reason=finish_reason)
        return _choice(text=text, finish_reason=finish_reason)


_CHAT = _Format("chat.completion", "chat.completion.chunk", "messages", chat=True)
_COMPLETION = _Format("text_completion", "text_completion", "prompt", chat=False)


def _build_request(request: Request, request_id: str, client_request_id: str | None,
                   body: ChatCompletionRequest | CompletionRequest, fmt: _Format, models: _Models, backend: Backend,
                   request_timeout_s: float) -> GenerateRequest:
    if body.n not in (None, 1):
        raise InvalidRequest(f"n={body.n}: {SEVERAL_PROMPTS}", param="n")
    card = models.resolve(body.model)
    tokenizer = backend.tokenizer(card.name)
    if isinstance(body, ChatCompletionRequest):
        prompt_token_ids = _chat_prompt(tokenizer, body)
    else:
        prompt_token_ids = _completion_prompt(tokenizer, body)
    if not prompt_token_ids:
        raise InvalidRequest(f"The {fmt.prompt_word} must not be empty.", param=fmt.prompt_word)
    sampling = SamplingParams(
        max_tokens=_max_tokens(body.requested_max_tokens(), len(prompt_token_ids), card.max_model_len, fmt),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=bool(body.ignore_eos),
    )
    traceparent = request.headers.get("traceparent")
    return GenerateRequest(
        request_id=request_id,
        client_request_id=client_request_id,
        model=card.name,
        prompt_token_ids=tuple(prompt_token_ids),
        sampling=sampling,
        deadline=time.time() + request_timeout_s,
        # W3C trace context: a malformed traceparent is ignored, not an error
        traceparent=traceparent if traceparent and _TRACEPARENT.fullmatch(traceparent) else None,
    )


def _chat_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
    except Exception as e:
        # Templates reject conversations they cannot render (roles out of order, unknown roles): bad input.
        raise InvalidRequest(f"The model's chat template rejected these messages: {e}", param="messages") from e
    return tokenizer.encode(text)


def _completion_prompt(tokenizer: Tokenizer, body: CompletionRequest) -> list[int]:
    prompt = body.prompt_text_or_ids()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    vocab_size = getattr(tokenizer, "vocab_size", None)  # not in the Tokenizer protocol; checked where known
    for token_id in prompt if isinstance(vocab_size, int) else ():
        if token_id >= vocab_size:
            raise InvalidRequest(
                f"Prompt token id {token_id} is out of range: the model's vocabulary has {vocab_size} tokens.",
                param="prompt",
            )
    return prompt


def _max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, fmt: _Format) -> int:
    remaining = max_model_len - num_prompt_tokens
    if requested is None:
        if remaining <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_model_len} tokens. However, your {fmt.prompt_word} "
                f"resulted in {num_prompt_tokens} tokens, which leaves no room for the completion. "
                f"Please reduce the length of the {fmt.prompt_word}.",
                param=fmt.prompt_word,
            )
        return min(DEFAULT_MAX_TOKENS, remaining)
    if requested > remaining:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {fmt.prompt_word}, {requested} in "
            f"the completion). Please reduce the length of the {fmt.prompt_word} or completion.",
            param=fmt.prompt_word,
        )
    return requested


# ------------------------------------------------------------------------------------ generation


class _RequestLog:
    """The one INFO line per request, written once however the request ends."""

    def __init__(self, request_id: str, model: str, stream: bool, client_request_id: str | None = None):
        self.request_id, self.model, self.stream = request_id, model, stream
        self.client_request_id = client_request_id
        self.num_prompt_tokens = 0
        self.max_tokens = 0
        self._started = time.perf_counter()
        self._written = False

    def done(self, status: int, *, finish_reason: str | None = None, num_completion_tokens: int = 0,
             error: str | None = None) -> None:
        if self._written:
            return
        self._written = True
        logger.info(
            "request_id=%s client_request_id=%s model=%s num_prompt_tokens=%d max_tokens=%d stream=%s status=%d "
            "duration_ms=%.1f finish_reason=%s num_completion_tokens=%d error=%s trace_id=%s",
            self.request_id, self.client_request_id or "-", self.model, self.num_prompt_tokens, self.max_tokens, self.stream, status,
            (time.perf_counter() - self._started) * 1000, finish_reason, num_completion_tokens, error,
            tracing.trace_id_hex() or "-",
        )


class _InternalError(APIError):
    status = 500
    code = "internal_error"


class _InflightLimit:
    """Counts the completions being served; acquire() is False at the limit (no waiting: the caller answers 429)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def acquire(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def release(self) -> None:
        assert self.count > 0, "released more requests than were admitted"
        self.count -= 1


class _ClientGone(Exception):
    """The client disconnected; nothing more can be sent."""


class _Generation(Response):
    """Runs one request on the backend while answering it, all in the request's own task.

    Algorithm: start a watcher task that reads `receive` and, if the client disconnects while we still
    work, cancels this task once (plain asyncio cancellation, so the backend's own cleanup awaits are not
    cancelled again). Wait for the first delta under the request's deadline; a failure up to here becomes
    a JSON error with its own status. Then either collect all deltas into one JSON body, or send the SSE
    headers and one event per delta; a failure after the headers becomes an error event and [DONE].
    Whatever happened, close the backend's generator (shielded, bounded) and write the log line.
    """

    def __init__(self, backend: Backend, req: GenerateRequest, body: ChatCompletionRequest | CompletionRequest,
                 fmt: _Format, log: _RequestLog, request_timeout_s: float, on_end: Callable[[], None]):
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
        try:
            await send(message)
        except OSError as e:  # servers on ASGI spec >= 2.4 raise on writes to a closed connection
            raise _ClientGone from e

    async def _fail(self, send: Send, exc: Exception) -> None:
        """Answers with the JSON error for `exc`; only before anything was sent."""
        if not isinstance(exc, (APIError, BackendError)):
            logger.error("request_id=%s unexpected error", self.req.request_id, exc_info=exc)
            exc = _InternalError(internal_error_message(self.req.request_id))
        self.log.done(exc.status, num_completion_tokens=self._num_tokens, error=exc.message)
        response = response_for(exc)
        await self._send(send, {"type": "http.response.start", "status": response.status_code,
                                "headers": response.raw_headers})
        await self._send(send, {"type": "http.response.body", "body": response.body})

    async def _fail_stream(self, send: Send, exc: Exception) -> tuple[int, str]:
        """Ends a started stream with an error event (the status line is sent, as OpenAI and vLLM do)."""
        if not isinstance(exc, (APIError, BackendError)):
            logger.error("request_id=%s unexpected error while streaming", self.req.request_id, exc_info=exc)
            exc = _InternalError(internal_error_message(self.req.request_id))
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


def _choice(*, finish_reason: str | None = None, **content: Any) -> dict:
    return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


# ------------------------------------------------------------------------------------ middleware


def _request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or _new_request_id(request.url.path)


def _new_request_id(path: str) -> str:
    return _ID_PREFIXES.get(path, "req-") + uuid.uuid4().hex


class _RequestContext:
    """ASGI middleware: names the request, checks its API key, enforces the body limit, stamps X-Request-Id.

    The key is checked before the body is read, so a client without one cannot make the router buffer
    anything. The body is read here in full (it is at most max_body_bytes) so an oversize one is refused
    before FastAPI parses anything, whether or not it declared a Content-Length; it is then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_keys: ApiKeys | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The id that keys work, subjects and cancels is always this router's own: two clients that send the
        # same X-Request-Id stay independent. The client's id is a label: logged, in spans, echoed back.
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        client_request_id = incoming if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming) else None
        request_id = _new_request_id(scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = request_id, client_request_id
        stamp = (REQUEST_ID_HEADER.lower().encode(), (client_request_id or request_id).encode())

        async def send_stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), stamp]}
            await send(message)

        refusal = self._check_key(scope)
        if refusal is not None:
            logger.info("request_id=%s status=401 path=%s error=%s", request_id, scope["path"], refusal.message)
            await response_for(refusal)(scope, receive, send_stamped)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            return  # the client left before it finished sending
        if isinstance(body, PayloadTooLarge):
            logger.info("request_id=%s status=413 error=%s", request_id, body.message)
            await response_for(body)(scope, receive, send_stamped)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_stamped)

    def _check_key(self, scope: Scope) -> Unauthorized | None:
        if self.api_keys is None or not self.api_keys.protects(scope["path"]):
            return None
        authorization = Headers(scope=scope).get("authorization")
        if self.api_keys.allows(authorization):
            return None
        if not authorization:
            return Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        return Unauthorized("Incorrect API key provided. Use one of the keys this server was started with "
                            "(--api-keys-file / PDSERVE_API_KEYS).")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | PayloadTooLarge | None:
        too_large = PayloadTooLarge(f"Request body is larger than the limit of {self.max_body_bytes} bytes.")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
