"""A real decode worker publishes the last chunks of its recent streams again after its NATS connection came back
(services/decode_worker/recent_chunks.py): the test plays the router on the bus, lets a stream end, restarts the
nats-server (the worker reconnects) and receives the stream's last chunks a second time, the same ones."""

from __future__ import annotations

import asyncio
import secrets
import time

from pdserve import nats_server, subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.protocol import DecodeAccepted, DecodeRequest, SamplingParams, TokenChunk
from pdserve.tokenizer import ByteTokenizer
from services.decode_worker.recent_chunks import PER_STREAM
from tests.e2e.conftest import Service

MAX_TOKENS = 12


async def test_a_decode_worker_publishes_its_last_chunks_again_after_a_reconnect(tmp_path):
    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    worker = Service(["decode-worker", "--nats", nats.url, "--engine", "mock", "--worker-id", "decode-again"],
                     str(tmp_path / "decode.log"))
    bus = await Bus.connect(nats.url, "stand-in-router")
    received: list[TokenChunk] = []
    try:
        subject = subjects.token_stream("stand-in-router", "again-1")

        async def on_chunk(chunk: TokenChunk) -> None:
            received.append(chunk)

        await bus.subscribe(subject, TokenChunk, on_chunk)
        request = DecodeRequest(request_id="again-1", model=MOCK_MODEL,
                                prompt_token_ids=tuple(ByteTokenizer().encode("said twice")),
                                sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0), stream_subject=subject,
                                stream_token=secrets.token_hex(16), deadline=time.time() + 60)
        deadline = time.monotonic() + 30
        while True:  # until the worker listens
            try:
                await bus.request(subjects.decode_request("decode-again"), request, DecodeAccepted, timeout_s=1.0)
                break
            except Exception:
                assert time.monotonic() < deadline, worker.output()[-3000:]
                await asyncio.sleep(0.2)
        while not received or received[-1].finish_reason is None:
            assert time.monotonic() < deadline, worker.output()[-3000:]
            await asyncio.sleep(0.05)
        first = list(received)
        assert [c.seq for c in first] == list(range(MAX_TOKENS))

        nats.stop()  # the worker (and this stand-in) lose NATS, then reconnect to the restarted server
        nats.restart()
        while len(received) < len(first) + PER_STREAM:
            assert time.monotonic() < deadline, worker.output()[-3000:]
            await asyncio.sleep(0.05)
        again = received[len(first):]
        assert again == first[-PER_STREAM:]  # the last chunks, the same, the final one included
        assert "publishing the last 8 chunks of 1 recent streams again" in worker.output()
    finally:
        await bus.close()
        worker.stop()
        nats.stop()
