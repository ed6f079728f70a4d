"""No work lost to another client, none done for nobody: `pdserve up --engine mock --prefill 2 --decode 2`.

- Two clients that send the same X-Request-Id are independent (the id that keys work is the router's own; the
  client's is a label, echoed back).
- 100 streams dropped right after their first chunk leave no decode running: the router's cancel may overtake
  its decode request (NATS orders no two subjects), and the decode worker remembers such a cancel.
- A client that leaves while its prompt is computed stops the prefill (its own 1P1D system, slow prefill).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.protocol import SamplingParams, StatsRequest, WorkerStats
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, free_port, get_json

pytestmark = pytest.mark.e2e

MS_PER_DECODE_STEP = 20
MAX_TOKENS = 400  # a stream decoded to the end for nobody would run 8 s


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"PDSERVE_MOCK_MS_PER_DECODE_STEP": str(MS_PER_DECODE_STEP)}
    with PdserveUp(tmp_path_factory.mktemp("lostwork"), free_port(), "--prefill", "2", "--decode", "2",
                   env=env).running(2, 2) as up:
        yield up


def expected(prompt: str, max_tokens: int) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


async def test_two_clients_with_the_same_request_id_are_independent(system):
    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[str, str, float]:
        started = time.monotonic()
        text = []
        async with http.stream("POST", f"{system.base_url}/v1/completions", headers={"X-Request-Id": "same-id"},
                               json={"model": MOCK_MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0,
                                     "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == "same-id"
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = orjson.loads(line[6:])
                    assert "error" not in event, event
                    text += [c["text"] for c in event["choices"]]
        return "".join(text), prompt, time.monotonic() - started

    async with httpx.AsyncClient(timeout=60) as http:
        results = await asyncio.gather(*(one(http, f"user {i} asks something") for i in range(4)))
    for text, prompt, seconds in results:
        assert text == expected(prompt, 40)
        assert seconds < 5, f"a stream took {seconds:.1f}s: the requests were not independent"
    # The router writes a request's log line after its last chunk, and pdserve up relays it: wait for it.
    deadline = time.monotonic() + 5
    while system.output().count("client_request_id=same-id") < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    log = system.output()
    assert log.count("client_request_id=same-id") >= 4  # kept as a label on the request's log line
    assert "already decodes" not in log


async def worker_stats(up: PdserveUp, role: str) -> list[WorkerStats]:
    _, health = get_json(f"{up.base_url}/health")
    bus = await Bus.connect(up.nats_url, "test-stats", **up.credentials("observer"))
    try:
        return [await bus.request(subjects.worker_stats(w["worker_id"]), StatsRequest(), WorkerStats, timeout_s=5)
                for w in health["workers"] if w["role"] == role]
    finally:
        await bus.close()


async def open_stream(port: int, prompt: str, max_tokens: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streamed completion sent on a plain socket, so that "dropped" means the socket is closed, nothing in between."""
    body = orjson.dumps({"model": MOCK_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                         "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return reader, writer


async def wait_until_idle(up: PdserveUp, role: str, since: float, within_s: float, what: str) -> None:
    """Every worker of the role with nothing running, queued or held, within within_s of `since`."""
    while True:
        stats = await worker_stats(up, role)
        if all(s.num_running == 0 and s.num_queued == 0 and s.num_held_blocks == 0 for s in stats):
            return
        assert time.monotonic() - since < within_s, f"{what}: {stats}"
        await asyncio.sleep(0.05)


async def test_a_hundred_streams_dropped_after_their_first_chunk_leave_no_decode_running(system):
    async def drop_after_first_chunk(i: int) -> None:
        reader, writer = await open_stream(system.port, f"dropped stream {i}", MAX_TOKENS)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200"), head
            await asyncio.wait_for(reader.readuntil(b"data: {"), 30)
        finally:
            writer.close()
            await writer.wait_closed()

    before = sum(s.num_requests_served for s in await worker_stats(system, "decode"))
    await asyncio.gather(*(drop_after_first_chunk(i) for i in range(100)))
    dropped_at = time.monotonic()
    # Decoding a stream to the end takes MAX_TOKENS x MS_PER_DECODE_STEP = 8 s: any left running shows up here
    # (and in `served` below), however loaded the machine is.
    await wait_until_idle(system, "decode", dropped_at, 5.0, "decodes still running for dropped streams")
    served = sum(s.num_requests_served for s in await worker_stats(system, "decode")) - before
    assert served == 0, f"{served} dropped streams were decoded to the end for nobody"


async def test_a_client_that_leaves_during_prefill_stops_the_prefill(tmp_path):
    """The router cancels on the prefill worker too (not only on decode) when the client leaves first: the
    prompt is not computed, nor its KV held until the lease ends, for nobody."""
    ms_per_prompt_token = 10.0
    prompt = "p" * 400  # 4 s of prefill
    env = {"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(ms_per_prompt_token)}
    with PdserveUp(tmp_path, free_port(), "--prefill", "1", "--decode", "1", env=env).running(1, 1) as up:
        _, writer = await open_stream(up.port, prompt, 8)
        deadline = time.monotonic() + 10
        while not any(s.num_running + s.num_queued for s in await worker_stats(up, "prefill")):
            assert time.monotonic() < deadline, "the prefill never started"
            await asyncio.sleep(0.05)
        writer.close()  # the client leaves while its prompt is computed
        await writer.wait_closed()
        # Computing the prompt to its end takes 4 s, and its KV would then be held for the lease (30 s).
        await wait_until_idle(up, "prefill", time.monotonic(), 2.0, "the prefill went on for a client that left")
        assert all(s.num_requests_served == 0 for s in await worker_stats(up, "decode"))
