"""Bounded HTTP edges for the router: connections that send nothing or trickle their headers are closed, and
an oversize request head gets 431.

uvicorn closes a connection that stays idle *between* requests (timeout_keep_alive), but not one that never
sends a request, nor one that sends its headers a byte at a time (slowloris): both hold a socket and a slot
for as long as the client likes. And its httptools parser has no limit on the request head, so a 1 MiB header
is buffered and then answered with a reset. This protocol (uvicorn's, plus a clock and a count) gives every
request head `header_timeout_s` from its first byte (and a new connection as long for its first byte), and at
most `max_header_bytes`.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.router.errors import error_payload

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


def limited_http_protocol(*, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                          max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`)."""
    assert header_timeout_s > 0 and max_header_bytes > 0

    class LimitedHttpProtocol(_LimitedHttpProtocol):
        pass

    LimitedHttpProtocol.header_timeout_s = header_timeout_s
    LimitedHttpProtocol.max_header_bytes = max_header_bytes
    return LimitedHttpProtocol


class _LimitedHttpProtocol(HttpToolsProtocol):
    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes = DEFAULT_MAX_HEADER_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # waiting for a request head, or the rest of one
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:  # a new request after an idle keep-alive connection: its clock starts
                self._arm_head_timer()
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            log.info("closed a connection from %s: request head over %d bytes (431)", _peer(self), self.max_header_bytes)
            self._answer_and_close(431, "Request Header Fields Too Large",
                                   f"The request's headers are larger than the limit of {self.max_header_bytes} bytes.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head = True  # the next request's head; its clock starts with its first byte

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:
            log.info("closed a connection from %s: request head not complete within %gs (408)", _peer(self),
                     self.header_timeout_s)
            self._answer_and_close(408, "Request Timeout",
                                   f"The request's headers did not arrive within {self.header_timeout_s:g}s.")
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def _answer_and_close(self, status: int, reason: str, message: str) -> None:
        body = orjson.dumps(error_payload(status, message))
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


def _peer(protocol: HttpToolsProtocol) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "?"
