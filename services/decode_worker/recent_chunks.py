"""The last chunks a decode worker published on each stream, published again after its NATS connection came back.

NATS delivers at most once: a chunk published just before this worker's NATS server died (a node of a cluster)
is lost, and nobody is told. A lost chunk in the middle of a stream shows as a gap at the router (it resumes the
request); a lost last chunk shows nothing, and the router would wait --stream-idle-timeout-s for it. So after a
reconnect the worker publishes again the last few chunks of every stream it served lately; the router drops
those it already has (a chunk's seq below the one it expects) and so gets the end it missed.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve.protocol import TokenChunk

KEEP_S = 30.0  # how long an ended stream's last chunks are kept: past a router's longest idle wait, by default
PER_STREAM = 8
MAX_STREAMS = 4096


@dataclass
class _Stream:
    subject: str
    chunks: deque = field(default_factory=lambda: deque(maxlen=PER_STREAM))
    ended_at: float | None = None  # monotonic


class RecentChunks:
    def __init__(self, keep_s: float = KEEP_S, max_streams: int = MAX_STREAMS):
        self.keep_s = keep_s
        self.max_streams = max_streams
        self._streams: OrderedDict[tuple[str, str], _Stream] = OrderedDict()  # (request id, stream token)

    def add(self, subject: str, chunk: TokenChunk) -> None:
        key = (chunk.request_id, chunk.stream_token)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(subject)
            self._prune()
        stream.chunks.append(chunk)
        if chunk.finish_reason is not None:
            stream.ended_at = time.monotonic()

    def end(self, request_id: str, stream_token: str) -> None:
        """The stream ended without a last chunk of its own (cancelled): keep it only as long as an ended one."""
        stream = self._streams.get((request_id, stream_token))
        if stream is not None and stream.ended_at is None:
            stream.ended_at = time.monotonic()

    def to_publish_again(self) -> list[tuple[str, TokenChunk]]:
        """(subject, chunk) of every stream's last chunks, oldest stream first, each stream's in order."""
        self._prune()
        return [(s.subject, chunk) for s in self._streams.values() for chunk in s.chunks]

    def __len__(self) -> int:
        return len(self._streams)

    def _prune(self) -> None:
        now = time.monotonic()
        for key, stream in list(self._streams.items()):
            if stream.ended_at is not None and now - stream.ended_at > self.keep_s:
                del self._streams[key]
        while len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)
