"""tracecontext: the W3C traceparent rides in OpenTelemetry's context, so the current span is what travels."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider

from pdserve import tracecontext

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_use_makes_a_traceparent_current_for_the_block_only():
    assert tracecontext.current() is None
    with tracecontext.use({"traceparent": TRACEPARENT}):
        assert tracecontext.current() == TRACEPARENT
        with tracecontext.use("00-nope"):
            assert tracecontext.current() is None
        assert tracecontext.current() == TRACEPARENT
    assert tracecontext.current() is None


def test_a_span_started_under_a_received_context_is_its_child_and_is_what_travels():
    tracer = TracerProvider().get_tracer("test")  # a recording tracer, without touching the global provider
    with tracecontext.use(TRACEPARENT):
        with tracer.start_as_current_span("handler") as span:
            ctx = span.get_span_context()
            assert span.parent.span_id == int("b7ad6b7169203331", 16)
            assert tracecontext.current() == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
            assert tracecontext.trace_id(tracecontext.current()) == tracecontext.trace_id(TRACEPARENT)


def test_continue_or_start_keeps_an_open_span_else_continues_or_starts_a_trace():
    with tracecontext.continue_or_start(None):
        started = tracecontext.current()
        assert tracecontext.valid(started)
    with tracecontext.continue_or_start(TRACEPARENT):
        assert tracecontext.current() == TRACEPARENT
        with tracecontext.continue_or_start(tracecontext.new_traceparent()):
            assert tracecontext.current() == TRACEPARENT
