"""OpenTelemetry spans: set-up, the tracer, and the span helpers every service uses.

Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: then
spans go through a BatchSpanProcessor to an OTLP/HTTP exporter (which reads the endpoint, headers and
timeouts from the standard OTEL_* variables itself). Otherwise nothing is installed and OpenTelemetry's
no-op tracer answers every call: no SDK import, no thread, no allocation per span beyond a stub.
The service name is `OTEL_SERVICE_NAME` if set, else `pdserve-<service>` (pdserve-router, ...).
Trace context crosses processes through tracecontext.py (NATS headers, the KV transfer's pull header).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider: Any = None  # the SDK TracerProvider once set up
_SHUTDOWN_TIMEOUT_S = 3.0  # a collector that is gone must not hold a stopping service for the exporter's retries


def enabled() -> bool:
    return _provider is not None


def setup_tracing(service: str) -> bool:
    """Install the OTLP exporter for this process if an endpoint is configured; True when tracing is on."""
    global _provider
    if _provider is not None or not any(os.environ.get(v) for v in _ENDPOINT_VARS):
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or f"pdserve-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing: spans of %s go to %s", name,
             os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown_tracing() -> None:
    """Export what is still buffered and stop the exporter, within a few seconds (call when the service ends)."""
    global _provider
    if _provider is None:
        return
    provider, _provider = _provider, None
    flusher = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    flusher.start()
    flusher.join(_SHUTDOWN_TIMEOUT_S)
    if flusher.is_alive():
        log.warning("tracing: spans not exported within %.0f s of shutdown (collector unreachable?); dropped",
                    _SHUTDOWN_TIMEOUT_S)


def tracer() -> trace.Tracer:
    return trace.get_tracer("pdserve")


def current_span() -> Span:
    return trace.get_current_span()


def trace_id_hex(span: Span | None = None) -> str | None:
    """The trace id of span (default: the current one) as 32 hex digits, or None without a trace."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def record_error(span: Span, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))


@contextlib.contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, context: Context | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A span made current for the block; an exception marks it failed.

    Closing a generator (GeneratorExit) or cancelling a task is how a finished or abandoned request ends,
    not a failure of the span: those end it with a `cancelled` attribute only where it was a cancel.
    """
    with tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                        record_exception=False, set_status_on_exception=False) as s:
        try:
            yield s
        except GeneratorExit:
            raise
        except asyncio.CancelledError:
            s.set_attribute("cancelled", True)
            raise
        except Exception as e:
            s.record_exception(e)
            record_error(s, f"{type(e).__name__}: {e}")
            raise


def record_span(name: str, *, kind: SpanKind, seconds: float, context: Context | None = None,
                attributes: Mapping[str, Any] | None = None, end_ns: int | None = None) -> None:
    """A span that ended at end_ns (wall clock, default now) and lasted `seconds`, for work measured
    elsewhere (another thread, vLLM's process)."""
    end = end_ns if end_ns is not None else time.time_ns()
    s = tracer().start_span(name, context=context, kind=kind, attributes=attributes,
                            start_time=end - int(max(seconds, 0.0) * 1e9))
    s.end(end_time=end)


def transfer_attributes(num_blocks: int, num_bytes: int, seconds: float) -> dict[str, Any]:
    """The KV transfer span attributes; gbps is GB/s (1e9 bytes per second), as TransferResult.gbps."""
    return {"num_blocks": num_blocks, "num_bytes": num_bytes, "duration_ms": seconds * 1000,
            "gbps": num_bytes / seconds / 1e9 if seconds > 0 else 0.0}
