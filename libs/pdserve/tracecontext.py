"""W3C trace context (`traceparent`) of the request being handled, carried across processes.

The router takes the client's `traceparent` or starts a new trace; the bus puts the current one in NATS
headers and sets it again on receipt, so every process handling a request sees the same trace id. Spans
(OpenTelemetry) build on this in the observability issue.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import secrets
from typing import Iterator, Mapping

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid(traceparent: str | None) -> bool:
    match = _TRACEPARENT.match(traceparent or "")
    return bool(match) and match.group(1) != "0" * 32 and match.group(2) != "0" * 16


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def current() -> str | None:
    return _current.get()


@contextlib.contextmanager
def use(headers_or_value: Mapping[str, str] | str | None) -> Iterator[None]:
    """Make a traceparent (or the one in NATS headers) current for the block."""
    if isinstance(headers_or_value, Mapping):
        value = headers_or_value.get("traceparent")
    else:
        value = headers_or_value
    token = _current.set(value if valid(value) else None)
    try:
        yield
    finally:
        _current.reset(token)
