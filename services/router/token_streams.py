"""The token chunks of every decode attempt of this router, from one NATS subscription.

One wildcard subscription for all of this router's token streams, made once at start: a subscription per
request would cost a round trip to NATS per request and could race the decode worker's first chunk. Each
decode attempt opens its own queue, keyed by (request, worker), before its request is sent, with a new secret
that only that worker is given: a chunk that comes late from an earlier attempt finds no queue, and one that
claims a worker without its secret is dropped.

Besides chunks, a queue receives None when its worker is declared gone (missed heartbeats) and RECONNECTED
when this router's NATS connection came back, or its worker's did (chunks published meanwhile may be lost).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass, field

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.protocol import TokenChunk

log = logging.getLogger(__name__)

RECONNECTED = object()  # queued on every open stream when the router's NATS connection came back


@dataclass
class TokenStream:
    """The chunks of one decode attempt, and the secret only its decode worker was given."""

    request_id: str
    worker_id: str
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenChunk, None (worker gone) or RECONNECTED


class TokenStreams:
    def __init__(self, bus: Bus, router_id: str):
        self.bus = bus
        self.router_id = router_id
        self._open: dict[tuple[str, str], TokenStream] = {}  # (request_id, worker_id)

    async def start(self) -> None:
        await self.bus.subscribe(subjects.token_streams(self.router_id), TokenChunk, self._on_chunk)

    def subject(self, request_id: str) -> str:
        return subjects.token_stream(self.router_id, request_id)

    def open(self, request_id: str, worker_id: str) -> TokenStream:
        stream = TokenStream(request_id, worker_id)
        self._open[(request_id, worker_id)] = stream
        return stream

    def close(self, stream: TokenStream) -> None:
        if self._open.get((stream.request_id, stream.worker_id)) is stream:
            del self._open[(stream.request_id, stream.worker_id)]

    def on_worker_gone(self, worker_id: str) -> None:
        for stream in list(self._open.values()):
            if stream.worker_id == worker_id:
                stream.chunks.put_nowait(None)

    def on_reconnect(self) -> None:
        for stream in list(self._open.values()):
            stream.chunks.put_nowait(RECONNECTED)

    def on_worker_reconnected(self, worker_id: str) -> None:
        """The worker's NATS connection was made again: what it published just before may be lost, as when ours
        was."""
        for stream in list(self._open.values()):
            if stream.worker_id == worker_id:
                stream.chunks.put_nowait(RECONNECTED)

    async def _on_chunk(self, chunk: TokenChunk) -> None:
        stream = self._open.get((chunk.request_id, chunk.worker_id))
        if stream is None:
            log.debug("request %s: dropped a chunk from %s (request over or moved)", chunk.request_id[:200],
                      chunk.worker_id[:200])
            return
        if not hmac.compare_digest(stream.token.encode(), chunk.stream_token.encode()):
            log.warning("request %s: dropped a chunk that claims to be from %s without its stream token",
                        chunk.request_id, chunk.worker_id)
            return
        stream.chunks.put_nowait(chunk)
