"""One OpenTelemetry server span per HTTP request to the router, around the whole ASGI app.

Plain ASGI (not Starlette's BaseHTTPMiddleware, which would move streaming responses into another task):
the span is current in the request's own task, so the orchestration's spans and the NATS messages it sends
are its children. The client's `traceparent` header, when valid, makes the span part of the client's trace.
The request id comes from the X-Request-Id response header the API stamps on every answer.
"""

from __future__ import annotations

from starlette.datastructures import Headers

from pdserve import tracecontext, tracing
from pdserve.tracing import SpanKind

REQUEST_ID_HEADER = b"x-request-id"
_UNTRACED_PATHS = frozenset({"/health", "/metrics"})  # polled every few seconds; a trace each would bury requests


def trace_requests(app):
    async def traced(scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _UNTRACED_PATHS:
            return await app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        parent = tracecontext.context_of(Headers(scope=scope).get("traceparent"))
        with tracing.span(f"{method} {path}", kind=SpanKind.SERVER, context=parent,
                          attributes={"http.request.method": method, "url.path": path}) as span:

            async def send_traced(message):
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        tracing.record_error(span, f"HTTP {status}")
                    for name, value in message.get("headers", ()):
                        if name.lower() == REQUEST_ID_HEADER:
                            span.set_attribute("request_id", value.decode("latin-1"))
                await send(message)

            await app(scope, receive, send_traced)

    return traced
