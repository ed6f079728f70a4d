"""Streams that lose chunks and workers that leave, against a real router on a real nats-server:

- chunks lost in NATS (a node of a cluster died) from the only decode worker there is: the router resumes on that
  same worker, whose later attempt replaces the earlier one; a cancel of the earlier attempt does not stop the
  later. The decode worker here is the test's stand-in (a script on the bus that drops chunk 3 of its first
  attempt on purpose), since a real loss cannot be made to happen on cue;
- the last chunk lost, then published again with the chunks before it (what a decode worker does after it
  reconnected to NATS): the router drops what it had and ends the stream at once, on the first attempt (before:
  it waited --stream-idle-timeout-s, then resumed); a real decode worker's republishing is in
  tests/integration/test_recent_chunks.py;
- the last chunk lost for good, the worker's heartbeat saying it reconnected to NATS: the router waits only a
  silent worker's allowance, then resumes;
- a decode worker that says goodbye after the router chose it but before the request reaches it: the request goes
  to the other decode worker at once (before: it waited for --stream-idle-timeout-s, 30 s), and the leaving
  worker refuses what still reaches it ("stopping").
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import pytest

from pdserve import config as cfg, nats_server, subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.engine.factory import mock_card
from pdserve.engine.mock_model import predict
from pdserve.protocol import (CancelRequest, DecodeAccepted, DecodeRequest, Heartbeat, SamplingParams, TokenChunk,
                              Usage)
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import Service, free_port, get_json

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12


def expected(prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


class LossyDecodeWorker:
    """A decode worker on the bus (the test's stand-in): generates the mock engine's tokens, but its first
    attempt of each request loses a chunk: chunk 3 ("middle": never published, the stream goes on), or the last
    one ("last": 0.5 s later every chunk is published again, as a worker does after it reconnected to NATS;
    "last_silent": nothing is published again, but its heartbeat says it reconnected to NATS)."""

    def __init__(self, bus: Bus, lose: str = "middle"):
        self.lose = lose
        self.num_reconnects = 0
        self.bus = bus
        self.worker_id = "decode-lossy"
        self.card = mock_card(cfg.build(cfg.WorkerConfig, {}, env={}))
        self.attempts: list[tuple[int, tuple[int, ...]]] = []  # (attempt, resume_token_ids) as received
        self.cancels: list[int | None] = []
        self._tasks: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        await self.bus.serve(subjects.decode_request(self.worker_id), DecodeRequest, self.on_decode)
        await self.bus.subscribe(subjects.CANCEL, CancelRequest, self.on_cancel)
        await self.beat()

    async def beat(self) -> None:
        now = time.time()
        await self.bus.publish(subjects.heartbeat("decode", self.worker_id), Heartbeat(
            worker_id=self.worker_id, role="decode", model=self.card, interval_s=1.0, sent_at=now, started_at=now,
            num_reconnects=self.num_reconnects))

    async def on_decode(self, req: DecodeRequest) -> DecodeAccepted:
        self.attempts.append((req.attempt, req.resume_token_ids))
        self._tasks[req.request_id] = asyncio.create_task(self._stream(req))
        return DecodeAccepted(request_id=req.request_id, worker_id=self.worker_id)

    async def on_cancel(self, msg: CancelRequest) -> None:
        self.cancels.append(msg.attempt)

    async def _stream(self, req: DecodeRequest) -> None:
        tokens = predict(req.prompt_token_ids, req.sampling).token_ids
        # tokens the client has: resumed ones, else the first from prefill (none here: no prefill worker runs)
        have = len(req.resume_token_ids) or (1 if req.first_token_id is not None else 0)
        sent = []
        for seq, i in enumerate(range(have, len(tokens))):
            await asyncio.sleep(0.01)
            last = i == len(tokens) - 1
            chunk = TokenChunk(
                request_id=req.request_id, worker_id=self.worker_id, stream_token=req.stream_token, seq=seq,
                token_ids=(tokens[i],), text=ByteTokenizer().decode([tokens[i]]),
                finish_reason="length" if last else None,
                usage=Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(tokens)) if last else None)
            sent.append(chunk)
            if req.attempt == 0 and ((self.lose == "middle" and seq == 3) or (self.lose.startswith("last") and last)):
                continue  # lost on the way
            await self.bus.publish(req.stream_subject, chunk)
        if req.attempt == 0 and self.lose == "last_silent":
            await asyncio.sleep(0.3)
            self.num_reconnects += 1  # told with the next heartbeat
        if req.attempt == 0 and self.lose == "last":
            await asyncio.sleep(0.5)
            for chunk in sent:  # all again, as after a reconnect: the router has all but the last
                await self.bus.publish(req.stream_subject, chunk)


async def run_against_lossy_worker(tmp_path, lose: str, prompt: str) -> tuple[httpx.Response, float,
                                                                          LossyDecodeWorker, Service]:
    """A real router (no prefill worker: decode prefills) and the stand-in decode worker; one completion."""
    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    port = free_port()
    router = Service(["router", "--nats", nats.url, "--port", str(port)], str(tmp_path / "router.log"))
    bus = await Bus.connect(nats.url, "lossy-decode-worker")
    try:
        worker = LossyDecodeWorker(bus, lose)
        await worker.start()
        deadline = time.monotonic() + 30
        while not (get_json(f"http://127.0.0.1:{port}/health")[1] or {}).get("serving"):
            assert time.monotonic() < deadline, router.output()[-3000:]
            await worker.beat()
            await asyncio.sleep(0.2)
        async with httpx.AsyncClient(timeout=60) as http:
            beating = asyncio.create_task(beat_every(worker, 0.5))
            started = time.monotonic()
            try:
                r = await http.post(f"http://127.0.0.1:{port}/v1/completions", json={
                    "model": MOCK_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            finally:
                beating.cancel()
        return r, time.monotonic() - started, worker, router
    finally:
        await bus.close()
        router.stop()
        nats.stop()


async def test_chunks_lost_from_the_only_decode_worker_resume_on_it_whole(tmp_path):
    prompt = "a stream that loses a chunk"
    r, _, worker, router = await run_against_lossy_worker(tmp_path, "middle", prompt)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(prompt)
    # No prefill worker: the first attempt decoded from the first token; the second resumed on the same worker
    # after the three tokens the client had before the gap.
    assert [a for a, _ in worker.attempts] == [0, 1] and len(worker.attempts[1][1]) == 3, worker.attempts
    assert 0 in worker.cancels  # the first attempt was cancelled by number, not the request as a whole
    assert re.search(r"resuming on decode-lossy after 3 tokens", router.output()), router.output()[-3000:]


async def test_a_lost_last_chunk_published_again_ends_the_stream_at_once(tmp_path):
    prompt = "a stream whose end is lost"
    r, took, worker, router = await run_against_lossy_worker(tmp_path, "last", prompt)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(prompt)
    assert [a for a, _ in worker.attempts] == [0] and took < 5, (worker.attempts, took)  # not the 30 s idle wait
    assert "resuming" not in router.output()


async def beat_every(worker: LossyDecodeWorker, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await worker.beat()


def test_a_decode_worker_that_leaves_after_being_chosen_costs_no_stream_timeout(tmp_path):
    nats = nats_server.start(store_dir=str(tmp_path / "nats"), die_with_parent=True)
    port = free_port()
    common = ["--nats", nats.url]
    services = [Service(["router", *common, "--port", str(port)], str(tmp_path / "router.log")),
                Service(["prefill-worker", *common, "--mock-ms-per-prompt-token", "3"], str(tmp_path / "prefill.log"))]
    decoders = {name: Service(["decode-worker", *common, "--worker-id", name], str(tmp_path / f"{name}.log"))
                for name in ("decode-one", "decode-two")}
    router = services[0]
    try:
        deadline = time.monotonic() + 60
        while True:
            _, health = get_json(f"http://127.0.0.1:{port}/health")
            if health and len(health["workers"]) == 3:
                break
            assert time.monotonic() < deadline, router.output()[-3000:]
            time.sleep(0.2)
        prompt = "a prompt long enough to take a while to prefill " * 6  # ~290 tokens at 3 ms: ~0.9 s

        async def run() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as http:
                started = time.monotonic()
                sent = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/completions", json={
                    "model": MOCK_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}))
                while not (match := re.search(r"decode (decode-\w+) \(\d+ cached\)", router.output())):
                    assert time.monotonic() - started < 10, router.output()[-3000:]
                    await asyncio.sleep(0.01)
                decoders[match.group(1)].process.send_signal(signal.SIGTERM)  # goodbye while P computes
                return await sent, time.monotonic() - started

        response, took = asyncio.run(run())
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected(prompt)
        assert took < 10, took  # not --stream-idle-timeout-s (30 s)
        assert re.search(r"has left \(goodbye or missed heartbeats\) since it was chosen|is stopping",
                         router.output()), router.output()[-3000:]
    finally:
        for s in [*services, *decoders.values()]:
            s.stop()
        nats.stop()


async def test_a_lost_last_chunk_of_a_worker_that_reconnected_costs_its_silence_allowance_not_the_idle_timeout(
        tmp_path):
    prompt = "a stream whose end is lost for good"
    r, took, worker, router = await run_against_lossy_worker(tmp_path, "last_silent", prompt)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(prompt)
    # Its heartbeat said it reconnected: the router waited a silent worker's allowance (3 s), then resumed there.
    assert [a for a, _ in worker.attempts] == [0, 1] and took < 10, (worker.attempts, took)
    assert "reconnected to NATS (chunks lost meanwhile)" in router.output()
