"""The router's OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

The app's wiring only; each step of a completion lives in a module of its own: middleware.py names the request
and checks its key and body size, openai_request.py turns the body into one GenerateRequest (model, template,
tokens, limits), the `Backend` (the orchestrator in production, a stand-in in tests) runs it, and response.py
turns its deltas into an OpenAI JSON body or SSE stream. Every error is errors.RouterError in OpenAI's shape.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from services.router.auth import ApiKeys
from services.router.backend import Backend
from services.router.errors import (InternalError, Overloaded, RouterError, install_error_handlers,
                                    internal_error_message, response_for)
from services.router.middleware import RequestContext, request_id_of
from services.router.models import ServedModels
from services.router.openai_request import build_request
from services.router.openai_types import CHAT, COMPLETION, ChatCompletionRequest, CompletionRequest, Format
from services.router.request_log import RequestLog
from services.router.response import CompletionResponse

logger = logging.getLogger(__name__)

# Retry-After of a 429 for the in-flight cap: at the cap, requests end all the time (512 requests of 30 s
# each free a slot every 60 ms), so a second is plenty; clients back off further on repeated 429s.
INFLIGHT_RETRY_AFTER_S = 1.0


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
    models = ServedModels(backend, dict(served_model_names or {}))
    inflight = InflightLimit(max_inflight)
    app = FastAPI(title="pdserve router", description="OpenAI-compatible API of pdserve", version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(RequestContext, max_body_bytes=max_body_bytes, api_keys=api_keys)

    def serve(request: Request, body: ChatCompletionRequest | CompletionRequest, fmt: Format) -> Response:
        request_id = request_id_of(request)
        client_request_id = getattr(request.state, "client_request_id", None)
        log = RequestLog(request_id, body.model, bool(body.stream), client_request_id)
        if not inflight.acquire():
            busy = Overloaded(f"The server is serving its limit of {inflight.limit} requests at once; retry after the "
                              "time in the Retry-After header.", retry_after_s=INFLIGHT_RETRY_AFTER_S)
            log.done(busy.status, error=busy.message)
            return response_for(busy)
        try:
            generate_request = build_request(request, request_id, client_request_id, body, fmt, models, backend,
                                             request_timeout_s)
        except RouterError as e:
            inflight.release()
            log.done(e.status, error=e.message)
            return response_for(e)
        except Exception:
            inflight.release()
            logger.exception("request_id=%s unexpected error while preparing the request", request_id)
            log.done(500, error="internal_error")
            return response_for(InternalError(internal_error_message(request_id)))
        log.num_prompt_tokens = len(generate_request.prompt_token_ids)
        log.max_tokens = generate_request.sampling.max_tokens
        return CompletionResponse(backend, generate_request, body, fmt, log, request_timeout_s, on_end=inflight.release)

    @app.post("/v1/chat/completions", response_model=None, summary="Chat completion (OpenAI)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return serve(request, body, CHAT)

    @app.post("/v1/completions", response_model=None, summary="Text completion (OpenAI)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return serve(request, body, COMPLETION)

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


class InflightLimit:
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


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
