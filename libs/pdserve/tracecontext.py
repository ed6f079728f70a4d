"""W3C trace context (`traceparent`) of the request being handled, carried across processes.

The context lives in OpenTelemetry's context (a contextvar), so the current span, if any, is what travels:
the bus injects the current span's `traceparent` into outgoing NATS headers and makes the sender's context
current on receipt, so a span a handler starts is a child of the span that sent the message. The router
takes the client's `traceparent` or starts a new trace. With tracing off (no exporter configured) spans are
non-recording but still carry their parent's context, so every process still sees the same trace id.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from typing import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_propagator = TraceContextTextMapPropagator()


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid(traceparent: str | None) -> bool:
    match = _TRACEPARENT.match(traceparent or "")
    return bool(match) and match.group(1) != "0" * 32 and match.group(2) != "0" * 16


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def current() -> str | None:
    """The `traceparent` of the current span (or of the context received with the message), or None."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    value = carrier.get("traceparent")
    return value if valid(value) else None


def of_span(span: trace.Span) -> str | None:
    """The `traceparent` that makes span the parent (of a span in another process), or None."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    value = carrier.get("traceparent")
    return value if valid(value) else None


def context_of(headers_or_value: Mapping[str, str] | str | None) -> otel_context.Context:
    """An OpenTelemetry context whose parent is that traceparent; an empty one if it is missing or malformed."""
    if isinstance(headers_or_value, Mapping):
        value = headers_or_value.get("traceparent")
    else:
        value = headers_or_value
    if not valid(value):
        return otel_context.Context()
    return _propagator.extract({"traceparent": value})


@contextlib.contextmanager
def use(headers_or_value: Mapping[str, str] | str | None) -> Iterator[None]:
    """Make a traceparent (or the one in NATS headers) current for the block; none if it is missing."""
    token = otel_context.attach(context_of(headers_or_value))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def continue_or_start(traceparent: str | None) -> Iterator[None]:
    """Keep the current trace (a span is open); else continue `traceparent`, else start a new trace."""
    if trace.get_current_span().get_span_context().is_valid:
        yield
        return
    with use(traceparent if valid(traceparent) else new_traceparent()):
        yield
