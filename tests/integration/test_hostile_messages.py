"""Malformed and hostile NATS messages on every subject the services of `pdserve up --engine mock` listen on.

Raw NATS clients (no pdserve Bus: they must be able to send anything), each holding the identity of the role
that may publish on a subject (NATS refuses everyone else: test_least_privilege.py), send garbage bytes, JSON
that is not an object, unknown and wrong message types, wrong schema versions, missing and mistyped fields,
huge strings and garbage headers to the router's token streams, both workers' request, release and stats
subjects, the cancel subject, heartbeats and goodbyes, and the broker's subjects. Then: every service is
still up and announced, each said in its log that it dropped what it could not read, request/reply
subjects answered an ErrorReply instead of leaving the caller to time out, a normal request is served
exactly as the engine predicts, and no KV block stays held (the leak accounting surface reads 0).
"""

from __future__ import annotations

import asyncio
import re
import time

import nats
import openai
import orjson
import pytest

from pdserve import subjects
from pdserve.nats_auth import inbox_prefix
from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.protocol import (SCHEMA_VERSION, CancelRequest, ErrorReply, Goodbye, KVLookup, SamplingParams,
                              StatsRequest, TokenChunk, WorkerStats, decode, encode)
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, free_port, get_json

pytestmark = pytest.mark.e2e

HUGE = "A" * (400 * 1024)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with PdserveUp(tmp_path_factory.mktemp("hostile"), free_port()).running(1, 1) as up:
        yield up


async def connect_as(up: PdserveUp, role: str, errors: list[str] | None = None) -> nats.NATS:
    """A raw NATS client with the identity of `role`; errors the server reports (permission violations) are
    appended to `errors`."""
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e))

    credentials = up.credentials(role)
    return await nats.connect(up.nats_url, name=f"hostile-{role}", inbox_prefix=inbox_prefix(credentials["user"]),
                              error_cb=on_error, **credentials)


def malformed(expected_type: str) -> list[bytes]:
    """Everything wrong a message for `expected_type` can be, short of being valid."""
    j = orjson.dumps
    return [
        b"", b"\x00\xff\xfe\x80 not json", b"{", b"[]", b"null", b"42", b'"a string"', b"[" * 5000 + b"]" * 5000,
        b'{"type": null}', j({"type": "no_such_message", "schema_version": SCHEMA_VERSION}),
        j({"type": expected_type}), j({"type": expected_type, "schema_version": 99}),
        j({"type": expected_type, "schema_version": "1"}), j({"type": expected_type, "schema_version": SCHEMA_VERSION}),
        j({"type": expected_type, "schema_version": SCHEMA_VERSION, "request_id": 7, "worker_id": ["x"],
           "prompt_token_ids": "abc", "sampling": {"max_tokens": -1}, "deadline": "soon", "seq": -3,
           "block_hashes": [1.5], "stored": {"a": 1}, "interval_s": 0, "role": "emperor"}),
        j({"type": HUGE, "schema_version": SCHEMA_VERSION}),
        j({"type": expected_type, "schema_version": SCHEMA_VERSION, "request_id": HUGE, "worker_id": HUGE}),
        HUGE.encode(),
    ]


def other_types() -> list[bytes]:
    """Valid messages of other types (harmless if one happens to be what the subject expects)."""
    return [encode(m) for m in (
        StatsRequest(), CancelRequest(request_id="hostile-unknown"), KVLookup(model=MOCK_MODEL, block_hashes=(1, 2)),
        ErrorReply(code="bad", message="hostile"), Goodbye(worker_id="hostile-ghost", role="decode"),
        TokenChunk(request_id="hostile-unknown", worker_id="hostile-ghost", seq=0, token_ids=(1,), text="x"),
    )]


def hostile_but_valid(prefill_address: str) -> dict[str, list[dict]]:
    """Well-formed requests with values a worker must refuse or survive, by the kind of request."""
    now = time.time()
    sampling = {"max_tokens": 3}
    prefill = [
        {"request_id": "hostile-model", "model": HUGE[:1000], "prompt_token_ids": [1, 2], "sampling": sampling,
         "deadline": now + 60},
        {"request_id": "hostile-late", "model": MOCK_MODEL, "prompt_token_ids": [1, 2], "sampling": sampling,
         "deadline": now - 60},
        {"request_id": "hostile-huge-prompt", "model": MOCK_MODEL, "prompt_token_ids": [7] * 200_000,
         "sampling": sampling, "deadline": now + 60},
        {"request_id": "hostile-odd-ids", "model": MOCK_MODEL, "prompt_token_ids": [-5, 2**40, 0],
         "sampling": sampling, "deadline": now + 60},
    ]
    params = {"worker_id": "hostile", "address": prefill_address, "transfer_id": "no-such-transfer", "token": "wrong",
              "block_ids": [0], "num_tokens": 3, "lease_expires_at": now + 60,
              "kv_layout": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "x", "dtype_bytes": 1,
                            "block_size": 32}}
    decode = [
        {"request_id": "hostile-decode-late", "model": MOCK_MODEL, "prompt_token_ids": [1], "sampling": sampling,
         "stream_subject": "hostile.sink", "stream_token": "s" * 32, "deadline": now - 1},
        {"request_id": "hostile-decode-bad-kv", "model": MOCK_MODEL, "prompt_token_ids": [1, 2, 3],
         "sampling": sampling, "first_token_id": 5, "kv_transfer_params": params,
         "stream_subject": "hostile.sink", "stream_token": "s" * 32, "deadline": now + 60},
    ]
    return {"prefill_request": prefill, "decode_request": decode}


async def send_everything(up: PdserveUp, health: dict) -> dict[str, list]:
    """Sends every hostile message, each as the role allowed to send it; returns the replies of request/reply
    subjects by subject."""
    router_id = health["router_id"]
    workers = {w["role"]: w for w in health["workers"]}
    prefill_id, decode_id = workers["prefill"]["worker_id"], workers["decode"]["worker_id"]
    prefill_address = workers["prefill"]["transfer_address"]
    served = {  # request/reply: subject -> (the role that may ask, the message type it expects)
        subjects.worker_stats(prefill_id): ("observer", "stats_request"),
        subjects.worker_stats(decode_id): ("observer", "stats_request"),
        subjects.prefill_request(prefill_id): ("router", "prefill_request"),
        subjects.decode_request(decode_id): ("router", "decode_request"),
        subjects.KV_LOOKUP: ("router", "kv_lookup"),
    }
    published = {  # fire and forget: subject -> (the role that may publish, the message type expected)
        subjects.token_stream(router_id, "hostile-unknown"): ("decode", "token_chunk"),
        subjects.kv_release(prefill_id): ("decode", "kv_release"),
        subjects.CANCEL: ("router", "cancel"),
        subjects.heartbeat("prefill", "hostile-ghost"): ("prefill", "heartbeat"),
        subjects.heartbeat("broker", "hostile-ghost"): ("broker", "heartbeat"),
        subjects.goodbye("decode", "hostile-ghost"): ("decode", "goodbye"),
        subjects.KV_HELD: ("prefill", "kv_held"),
        subjects.KV_TRANSFER_DONE: ("decode", "kv_transfer_done"),
        subjects.kv_events(prefill_id): ("prefill", "kv_event"),
    }
    garbage_headers = {"traceparent": "00-zz-garbage", subjects.HEADER_REQUEST_ID: "r" * 10_000}
    replies: dict[str, list] = {s: [] for s in served}
    violations: list[str] = []
    clients = {role: await connect_as(up, role, violations)
               for role in ("router", "prefill", "decode", "broker", "observer")}
    try:
        for subject, (role, expected) in published.items():
            nc = clients[role]
            for payload in malformed(expected) + other_types():
                await nc.publish(subject, payload)
                await nc.publish(subject, payload, headers=garbage_headers)
            await nc.flush()
        for subject, (role, expected) in served.items():
            nc = clients[role]
            for payload in malformed(expected) + other_types():
                replies[subject].append(await nc.request(subject, payload, timeout=10))
            replies[subject].append(await nc.request(subject, b"\x00", timeout=10, headers=garbage_headers))
        router = clients["router"]
        for kind, bodies in hostile_but_valid(prefill_address).items():
            subject = subjects.prefill_request(prefill_id) if kind == "prefill_request" else subjects.decode_request(decode_id)
            for body in bodies:
                data = orjson.dumps({"type": kind, "schema_version": SCHEMA_VERSION, **body})
                replies[subject].append(await router.request(subject, data, timeout=30))
        # Whatever the hostile requests got a worker to hold is given back by the cancel any router would send.
        for body in [b for bodies in hostile_but_valid(prefill_address).values() for b in bodies]:
            await router.publish(subjects.CANCEL, encode(CancelRequest(request_id=body["request_id"])))
        await router.flush()
    finally:
        for nc in clients.values():
            await nc.close()
    assert not violations, f"each message was sent by the role allowed to: {violations[:3]}"
    return replies


def test_hostile_messages_leave_every_service_serving(system):
    status, health = get_json(f"{system.base_url}/health")
    assert status == 200
    replies = asyncio.run(send_everything(system, health))

    # Request/reply subjects answered every message (none left its sender to time out); the malformed ones
    # with ErrorReply(bad_request), the well-formed hostile ones with a refusal or an answer.
    for subject, answers in replies.items():
        codes = []
        for raw in answers:
            try:
                codes.append(decode(raw.data, ErrorReply).code)
            except ValueError:
                codes.append("answered")
        assert codes.count("bad_request") >= len(malformed("x")) - 1, (subject, codes)
        if ".prefill." in subject:
            assert {"wrong_model", "deadline_passed", "kv_full"} <= set(codes), codes
        if ".decode." in subject:
            assert "deadline_passed" in codes, codes

    # Every service is still up and announced; none exited.
    time.sleep(1.5)  # a heartbeat interval and a bit: a dead worker would be missing by now
    status, health = get_json(f"{system.base_url}/health")
    assert status == 200 and health["status"] == "ok", health
    assert sorted(w["role"] for w in health["workers"]) == ["decode", "prefill"], health
    assert "hostile-ghost" not in str(health) and len(health["kv_brokers"]) == 1
    log = system.output()
    assert "exited with status" not in log
    for service in ("router", "prefill-worker", "decode-worker", "kv-broker"):
        assert re.search(rf"WARNING {service}\[\d+\] pdserve\.bus: .* dropped invalid message", log), service
    for crash in ("Task exception was never retrieved", "Exception in callback", "Fatal error"):
        assert crash not in log

    # A normal request is served, exactly as the engine predicts.
    client = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    r = client.completions.create(model=MOCK_MODEL, prompt="Still there?", max_tokens=12, temperature=0)
    expected = predict(ByteTokenizer().encode("Still there?"), SamplingParams(max_tokens=12, temperature=0))
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == 12

    # Nothing stays held: every worker's held blocks return to 0 (the leak accounting surface).
    asyncio.run(assert_nothing_held(system, health))


async def assert_nothing_held(up: PdserveUp, health: dict, timeout_s: float = 15) -> None:
    nc = await connect_as(up, "observer")
    try:
        for worker in health["workers"]:
            deadline = time.monotonic() + timeout_s
            while True:
                raw = await nc.request(subjects.worker_stats(worker["worker_id"]), encode(StatsRequest()), timeout=5)
                stats = decode(raw.data, WorkerStats)
                if stats.num_held_blocks == 0 and stats.kv_usage == 0 and stats.num_queued == 0:
                    break
                assert time.monotonic() < deadline, f"{worker['worker_id']} still holds KV: {stats}"
                await asyncio.sleep(0.2)
    finally:
        await nc.close()
