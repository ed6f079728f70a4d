"""RecentChunks: each stream's last PER_STREAM chunks, in order; ended streams kept keep_s, then forgotten; a
bounded number of streams."""

from __future__ import annotations

import time

from pdserve.protocol import TokenChunk
from services.decode_worker.recent_chunks import PER_STREAM, RecentChunks


def chunk(request_id: str, seq: int, last: bool = False) -> TokenChunk:
    return TokenChunk(request_id=request_id, worker_id="d", stream_token="t" * 32, seq=seq, token_ids=(1,), text="a",
                      finish_reason="length" if last else None)


def test_the_last_chunks_of_each_stream_are_kept_until_an_ended_stream_expires():
    recent = RecentChunks(keep_s=0.2, max_streams=2)
    for seq in range(20):
        recent.add("s1", chunk("r1", seq, last=seq == 19))
    recent.add("s2", chunk("r2", 0))
    again = recent.to_publish_again()
    assert [(s, c.request_id, c.seq) for s, c in again] == (
        [("s1", "r1", seq) for seq in range(20 - PER_STREAM, 20)] + [("s2", "r2", 0)])
    recent.end("r2", "t" * 32)  # cancelled: no last chunk of its own
    time.sleep(0.3)
    assert recent.to_publish_again() == [] and len(recent) == 0
    for request_id in ("a", "b", "c"):  # running streams: the oldest goes past max_streams
        recent.add("s", chunk(request_id, 0))
    assert [c.request_id for _, c in recent.to_publish_again()] == ["b", "c"]
