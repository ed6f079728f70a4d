"""The router's HTTP errors, all in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

OpenAI clients (the official SDK, LangChain, curl scripts) read `error.message` and branch on the status,
so every failure leaves the router in this shape: our own `RouterError`s (one family, from validation to a
failed worker),
FastAPI's request validation (re-shaped from 422 to 400, as OpenAI and vLLM answer), Starlette's 404/405,
and anything unexpected (a 500 that names the request id but never shows a traceback).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


class RouterError(Exception):
    """Every error a client of the router sees, from HTTP validation to a worker that failed: the HTTP `status`,
    OpenAI's `code`, the `message`, where one field is at fault its `param`, and where trying again later may
    succeed `retry_after_s` (sent as Retry-After, whole seconds, at least 1)."""

    status = 500
    code: str | None = "internal_error"
    retry_after_s: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidRequest(RouterError):
    status = 400
    code = None


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(RouterError):
    """A /v1 request without one of the router's API keys (as OpenAI answers a wrong key)."""

    status = 401
    code = "invalid_api_key"


class ModelNotFound(RouterError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(RouterError):
    """The request body is over --max-body-bytes, or the request would not fit in one message on the bus."""

    status = 413
    code = "payload_too_large"


class Overloaded(RouterError):
    """The router serves its --max-inflight requests, every worker that could take the request is full, or its
    deadline cannot be met: come back later (429 + Retry-After)."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message, retry_after_s=retry_after_s)


class InternalError(RouterError):
    """Something unexpected: the message names the request id, never a traceback."""


class UpstreamError(RouterError):
    """A worker failed the request and no other could take over (502)."""

    status = 502
    code = "upstream_error"


class NoWorkerError(RouterError):
    """No live worker of a role serves the model (503)."""

    status = 503
    code = "no_worker"


class BusUnavailable(RouterError):
    """The router's NATS connection is down (it reconnects by itself): 503 at once, with Retry-After."""

    status = 503
    code = "bus_unavailable"
    retry_after_s = 1.0


class UpstreamTimeout(RouterError):
    """A worker did not answer within its deadline and no other could take over (504)."""

    status = 504
    code = "upstream_timeout"


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_payload(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = orjson.dumps(error_payload(status, message, param=param, code=code))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def response_for(exc: RouterError) -> Response:
    """The JSON error response for an error raised while serving a request."""
    headers = {}
    if exc.retry_after_s is not None:  # errors that shed load (429, some 503s): when trying again may succeed
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=headers or None)


def internal_error_message(request_id: str | None) -> str:
    return f"Internal server error (request_id={request_id}); the router's log has the details."


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _param(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _describe(error: dict) -> tuple[str, str | None]:
    """One pydantic/FastAPI error -> (message, param)."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type")
    if kind == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"Malformed JSON body: {error.get('ctx', {}).get('error', 'decode error')}{where}.", None
    param = _param(loc)
    if param is None:
        if kind == "missing":
            return "The request body is missing: send a JSON object with Content-Type: application/json.", None
        if isinstance(error.get("input"), (bytes, bytearray)):
            # FastAPI hands over the raw bytes when the Content-Type is not JSON (curl -d without -H).
            return "The request body must be a JSON object sent with Content-Type: application/json.", None
        return "The request body must be a JSON object.", None
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {error.get('msg', 'invalid')}.", param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = list(exc.errors())
    described = [_describe(e) for e in errors[:3]]
    message = " ".join(m for m, _ in described) or "Invalid request."
    if len(errors) > 3:
        message += f" ({len(errors) - 3} more invalid fields.)"
    param = described[0][1] if described else None
    logger.info("request_id=%s status=400 error=%s", _request_id(request), message)
    return error_response(400, message, param=param)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        message = f"Unknown path {request.url.path}; see /docs for the endpoints this server has."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(exc.detail)
    logger.info("request_id=%s status=%d error=%s", _request_id(request), exc.status_code, message)
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}) or None)


async def _on_router_error(request: Request, exc: RouterError) -> Response:
    logger.info("request_id=%s status=%d error=%s", _request_id(request), exc.status, exc.message)
    return response_for(exc)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Runs in Starlette's outermost middleware, outside the one that stamps X-Request-Id, so stamp it here.
    request_id = _request_id(request)
    logger.error("request_id=%s status=500 unexpected error", request_id, exc_info=exc)
    echoed = getattr(request.state, "client_request_id", None) or request_id
    headers = {REQUEST_ID_HEADER: echoed} if echoed else None
    return error_response(500, internal_error_message(request_id), code="internal_error", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Routes every error the app can raise to an OpenAI-shaped response."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RouterError, _on_router_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
