"""Attacks on the bus of a default `pdserve up --engine mock --prefill 2 --decode 2`, each of which worked before
it gave every role its own NATS identity (see pdserve/nats_auth.py):

- an anonymous client cannot connect at all;
- the observer identity (for `nats sub 'pdserve.>'`) sees lifecycle events but no prompt, token or transfer token,
  and no role can read another role's replies;
- only the decode worker the router chose can write into a stream: chunks from other roles are refused by NATS,
  and chunks from the decode identity without the attempt's stream secret are dropped by the router;
- only the router can cancel; goodbyes and heartbeats from a wrong role, or claiming another role, take no effect;
  a heartbeat with an absurd interval is refused.
Real nats-server, real services, raw NATS clients (they must be able to send anything).
"""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import nats
import orjson
import pytest

from pdserve import subjects
from pdserve.engine.mock_model import predict
from pdserve.nats_auth import inbox_prefix
from pdserve.protocol import SCHEMA_VERSION, CancelRequest, Goodbye, Heartbeat, SamplingParams, TokenChunk, encode
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, free_port, get_json, stream_completion

pytestmark = pytest.mark.e2e

MS_PER_DECODE_STEP = 20  # streams last long enough to be attacked while they run
ROLES = ("router", "prefill", "decode", "broker", "observer")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"PDSERVE_MOCK_MS_PER_DECODE_STEP": str(MS_PER_DECODE_STEP)}
    with PdserveUp(tmp_path_factory.mktemp("privilege"), free_port(), "--prefill", "2", "--decode", "2",
                   env=env).running(2, 2) as up:
        yield up


class Client:
    """A raw NATS client with one role's identity; what the server refused it is in `.violations`."""

    def __init__(self, nc: nats.NATS, violations: list[str]):
        self.nc, self.violations = nc, violations
        self.received: list[tuple[str, bytes]] = []

    async def listen(self, subject: str) -> None:
        async def on_msg(msg) -> None:
            self.received.append((msg.subject, msg.data))

        await self.nc.subscribe(subject, cb=on_msg)
        await self.nc.flush()


async def connect_as(up: PdserveUp, role: str) -> Client:
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e))

    credentials = up.credentials(role)
    nc = await nats.connect(up.nats_url, name=f"attacker-{role}", error_cb=on_error,
                            inbox_prefix=inbox_prefix(credentials["user"]), **credentials)
    return Client(nc, violations)


def expected(prompt: str, max_tokens: int) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)).text


async def stream(up: PdserveUp, prompt: str, max_tokens: int) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        return await stream_completion(http, up.base_url, prompt, max_tokens)


async def test_an_anonymous_client_cannot_connect(system):
    with pytest.raises(Exception, match="Authorization Violation"):
        nc = await nats.connect(system.nats_url, allow_reconnect=False, connect_timeout=2)
        await nc.close()


async def test_the_observer_sees_lifecycle_events_but_no_prompt_token_or_transfer_secret(system):
    observer = await connect_as(system, "observer")
    others = {role: await connect_as(system, role) for role in ("prefill", "decode", "broker")}
    try:
        await observer.listen("pdserve.>")
        for client in (observer, *others.values()):  # other roles' replies, streams and requests: refused
            for subject in ("_INBOX.>", "_INBOX_pdserve-router.>", "pdserve.stream.>", ">"):
                await client.listen(subject)
        for role, client in (("observer", observer), *others.items()):  # a fake decode worker reads prompts
            if role != "decode":
                await client.listen(subjects.decode_request("*"))
        marker = "secret-" + secrets.token_hex(4)
        prompts = [f"{marker} question {i}: " + "x" * 100 for i in range(6)]
        texts = await asyncio.gather(*(stream(system, p, 8) for p in prompts))
        assert texts == [expected(p, 8) for p in prompts]
        await asyncio.sleep(1.2)  # a heartbeat interval: lifecycle events are there

        seen = [s for s, _ in observer.received]
        assert any(s.startswith("pdserve.heartbeat.") for s in seen) and subjects.KV_HELD in seen, seen
        # the fields that grant something never reach it: no prompt, no token text, no transfer token
        for subject, data in observer.received:
            assert marker.encode() not in data and b"kv_transfer_params" not in data and b'"token"' not in data, subject
            assert not subject.startswith(("pdserve.prefill.", "pdserve.decode.", "pdserve.stream.", "_INBOX")), subject
        for role, client in (("observer", observer), *others.items()):
            assert all(not s.startswith(("_INBOX", "pdserve.stream.")) for s, _ in client.received), role
            if role != "decode":
                assert all(not s.startswith("pdserve.decode.") for s, _ in client.received), role
            assert any("permissions violation for subscription" in v.lower() for v in client.violations), (role, client.violations)
    finally:
        for client in (observer, *others.values()):
            await client.nc.close()


async def test_only_the_chosen_decode_worker_can_write_into_a_stream(system):
    """An attacker learns request ids from kv.held (the observer sees them) and forges chunks with the right
    worker id and every sequence number: as the decode identity (no stream secret) and as every other role."""
    observer = await connect_as(system, "observer")
    forgers = {role: await connect_as(system, role) for role in ("decode", "prefill", "broker", "observer")}
    _, health = get_json(f"{system.base_url}/health")
    router_id = health["router_id"]
    decode_ids = [w["worker_id"] for w in health["workers"] if w["role"] == "decode"]
    forged = 0
    attacks: set[asyncio.Task] = set()

    async def forge(request_id: str) -> None:
        nonlocal forged
        for delay_s in (0.0, 0.05, 0.1, 0.2):  # while the 20-token stream (~0.4 s) runs
            await asyncio.sleep(delay_s)
            for client in forgers.values():
                for worker_id in decode_ids:
                    for seq in range(1, 12):
                        chunk = TokenChunk(request_id=request_id, worker_id=worker_id, seq=seq, token_ids=(88,),
                                           text="INJECTED", stream_token=secrets.token_hex(16))
                        await client.nc.publish(subjects.token_stream(router_id, request_id), encode(chunk))
                        forged += 1

    async def on_held(msg) -> None:
        task = asyncio.create_task(forge(orjson.loads(msg.data)["request_id"]))
        attacks.add(task)
        task.add_done_callback(attacks.discard)

    try:
        await observer.nc.subscribe(subjects.KV_HELD, cb=on_held)
        await observer.nc.flush()
        prompts = [f"stream {i} that someone wants to write into" for i in range(10)]
        texts = await asyncio.gather(*(stream(system, p, 20) for p in prompts))
        assert forged > 0
        assert texts == [expected(p, 20) for p in prompts]
        for role, client in forgers.items():
            if role != "decode":
                assert any("permissions violation for publish" in v.lower() for v in client.violations), role
        assert "without its stream token" in system.output()
    finally:
        for client in (observer, *forgers.values()):
            await client.nc.close()


async def test_only_the_router_can_cancel_and_wrong_roles_cannot_unlist_workers(system):
    clients = {role: await connect_as(system, role) for role in ROLES}
    _, health = get_json(f"{system.base_url}/health")
    workers = [(w["role"], w["worker_id"]) for w in health["workers"]]

    async def attack(msg) -> None:
        request_id = orjson.loads(msg.data)["request_id"]
        for role, client in clients.items():
            if role != "router":
                await client.nc.publish(subjects.CANCEL, encode(CancelRequest(request_id=request_id)))

    try:
        # Cancels for every request the moment its KV is held, from every role but the router's.
        await clients["observer"].nc.subscribe(subjects.KV_HELD, cb=attack)
        # Goodbyes for every real worker from every role that is not the worker's own (and, from the prefill
        # identity, on its own role's subject while claiming to be the decode worker).
        for role, client in clients.items():
            for worker_role, worker_id in workers:
                if role != worker_role:
                    await client.nc.publish(subjects.goodbye(worker_role, worker_id),
                                            encode(Goodbye(worker_id=worker_id, role=worker_role)))
        for _, worker_id in workers:
            if worker_id.startswith("decode"):
                await clients["prefill"].nc.publish(subjects.goodbye("prefill", worker_id),
                                                    encode(Goodbye(worker_id=worker_id, role="decode")))
        # A worker that claims to beat once in 1e9 s (it would stay listed for ever), and one that claims
        # another role than its subject's.
        now = time.time()
        forever = {"type": "heartbeat", "schema_version": SCHEMA_VERSION, "worker_id": "fake-forever",
                   "role": "prefill", "interval_s": 1e9, "sent_at": now, "started_at": now}
        await clients["prefill"].nc.publish(subjects.heartbeat("prefill", "fake-forever"), orjson.dumps(forever))
        other_role = Heartbeat(worker_id="fake-decode", role="decode", interval_s=1, sent_at=now, started_at=now)
        await clients["prefill"].nc.publish(subjects.heartbeat("prefill", "fake-decode"), encode(other_role))
        # An idle prefill worker that would attract requests, announced by every role but prefill's.
        fake = Heartbeat(worker_id="fake-idle", role="prefill", interval_s=1, sent_at=now, started_at=now)
        for role in ("router", "decode", "broker", "observer"):
            await clients[role].nc.publish(subjects.heartbeat("prefill", "fake-idle"), encode(fake))
        for client in clients.values():
            await client.nc.flush()

        prompts = [f"request {i} nobody may cancel" for i in range(20)]
        texts = await asyncio.gather(*(stream(system, p, 10) for p in prompts))
        assert texts == [expected(p, 10) for p in prompts]
        _, health = get_json(f"{system.base_url}/health")
        assert sorted((w["role"], w["worker_id"]) for w in health["workers"]) == sorted(workers), health
        for role, client in clients.items():  # each sent something its role may not
            assert any("permissions violation for publish" in v.lower() for v in client.violations), role
        log = system.output()
        assert "that claims to be from pdserve.heartbeat.decode.fake-decode" in log
        assert "that claims to be from pdserve.goodbye.decode." in log
        assert "dropped invalid message on pdserve.heartbeat.prefill.fake-forever" in log
    finally:
        for client in clients.values():
            await client.nc.close()
