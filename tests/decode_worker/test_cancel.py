"""Decode handlers: a request cancelled however early leaves nothing counted, held or unreleased.

After a NATS outage a decode worker receives, in one burst, decode requests its router gave up on meanwhile
and the cancels that followed; a cancel can then reach a decode task that was created and has not run yet.
Such a task never runs its own clean-up, so what the worker counted when it accepted the request has to be
undone however the task ends: a leaked in-flight count makes the worker look busy for ever (routing avoids
it; at --max-queue it refuses everything), a missing release keeps the prefill's KV until its lease ends.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import AsyncIterator

from pdserve import subjects
from pdserve.engine.base import TokenOutput
from pdserve.peer_paths import PeerPaths
from pdserve.protocol import (CancelRequest, DecodeAccepted, DecodeRequest, ErrorReply, KVLayout, KVRelease,
                              KVTransferParams, SamplingParams)
from services.decode_worker.main import DecodeHandlers

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="bf16", dtype_bytes=2, block_size=16)


class FakeEngine:
    """Generates one token per step until max_tokens; counts what runs and what is aborted."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.aborted: list[str] = []

    async def generate(self, request_id, prompt_token_ids, sampling, first_token_id, kv_transfer_params,
                       resume_token_ids=(), prefix_kv=None) -> AsyncIterator[TokenOutput]:
        self.running.add(request_id)
        try:
            for i in range(sampling.max_tokens):
                await asyncio.sleep(0.001)
                yield TokenOutput((97,), "a", "length" if i == sampling.max_tokens - 1 else None)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        task = next((t for t in asyncio.all_tasks() if t.get_name() == f"decode-{request_id}"), None)
        self.aborted.append((request_id, task is None or task.cancelling() > 0))


class FakeBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, object]] = []

    async def publish(self, subject: str, msg: object, *, request_id: str | None = None) -> None:
        self.published.append((subject, msg))


class FakeRuntime:
    """The parts of WorkerRuntime the decode handlers use."""

    worker_id = "decode-1"
    config = SimpleNamespace(kv_lease_s=30.0)

    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.bus = FakeBus()
        self.num_in_flight = 0
        self.num_requests_served = 0
        self._spawned: set[asyncio.Task] = set()
        self.peer_paths = PeerPaths(self.worker_id, probe_interval_s=60.0, connect_timeout_s=1.0,
                                    on_change=self._announced)
        self.num_announcements = 0

    async def _announced(self) -> None:
        self.num_announcements += 1

    def refusal(self, model: str, deadline: float):
        return None

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)
        return task


def request(request_id: str, with_kv: bool) -> DecodeRequest:
    params = KVTransferParams(worker_id="prefill-1", address="tcp://127.0.0.1:1", transfer_id=f"t-{request_id}",
                              token="secret", block_ids=(1, 2), num_tokens=20, kv_layout=LAYOUT,
                              lease_expires_at=time.time() + 30) if with_kv else None
    return DecodeRequest(request_id=request_id, model="m", prompt_token_ids=tuple(range(20)),
                         sampling=SamplingParams(max_tokens=5, temperature=0), first_token_id=97 if with_kv else None,
                         kv_transfer_params=params, stream_subject="s", stream_token="t" * 32,
                         deadline=time.time() + 30)


async def test_a_request_cancelled_before_its_task_ran_is_no_longer_counted_and_its_kv_is_released():
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    await handlers.on_decode(request("early", with_kv=True))
    await handlers.on_cancel(CancelRequest(request_id="early"))  # before the decode task took its first step
    await asyncio.sleep(0.05)
    assert rt.num_in_flight == 0
    assert not rt.engine.running
    releases = [m for s, m in rt.bus.published if s == subjects.kv_release("prefill-1")]
    assert [(r.request_id, r.ok) for r in releases if isinstance(r, KVRelease)] == [("early", False)]
    # The worker takes the same request id again (a client may reuse one) and serves it.
    await handlers.on_decode(request("early", with_kv=False))
    await asyncio.sleep(0.1)
    assert rt.num_in_flight == 0 and rt.num_requests_served == 1


async def test_requests_cancelled_while_running_or_served_to_the_end_are_no_longer_counted():
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    await handlers.on_decode(request("served", with_kv=False))
    await handlers.on_decode(request("cancelled", with_kv=False))
    await asyncio.sleep(0.002)
    await handlers.on_cancel(CancelRequest(request_id="cancelled"))
    await asyncio.sleep(0.1)
    assert rt.num_in_flight == 0 and rt.num_requests_served == 1 and not rt.engine.running


async def test_a_cancel_that_overtakes_its_request_makes_the_worker_refuse_it():
    """NATS orders no two subjects: the router's cancel of a dropped stream can arrive before its decode request.
    The request is then refused on arrival (nothing decoded for nobody) and the prefill's KV released at once."""
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    await handlers.on_cancel(CancelRequest(request_id="overtaken"))
    reply = await handlers.on_decode(request("overtaken", with_kv=True))
    assert isinstance(reply, ErrorReply) and reply.code == "cancelled"
    await asyncio.sleep(0.05)
    assert rt.num_in_flight == 0 and not rt.engine.running and rt.num_requests_served == 0
    releases = [m for s, m in rt.bus.published if s == subjects.kv_release("prefill-1")]
    assert [(r.request_id, r.ok) for r in releases] == [("overtaken", False)]
    # remembered once: the same id later is another request (a router resending after a NATS blip)
    await handlers.on_decode(request("overtaken", with_kv=False))
    await asyncio.sleep(0.1)
    assert rt.num_requests_served == 1


async def test_a_cancel_for_another_worker_is_ignored_and_one_for_this_worker_stops_the_task_then_aborts():
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    await handlers.on_decode(request("r1", with_kv=False))
    await asyncio.sleep(0.002)
    task = handlers._tasks["r1"]
    await handlers.on_cancel(CancelRequest(request_id="r1", worker_id="decode-2"))  # a retry elsewhere goes on
    assert rt.engine.aborted == [] and "r1" in rt.engine.running
    await handlers.on_cancel(CancelRequest(request_id="r1", worker_id="decode-1"))
    assert rt.engine.aborted == [("r1", True)]  # the task was told to stop before the engine's abort
    assert task.cancelling()
    await asyncio.sleep(0.05)
    assert rt.num_in_flight == 0 and not rt.engine.running and rt.num_requests_served == 0


async def test_a_later_attempt_replaces_the_running_one_and_a_cancel_of_the_earlier_does_not_stop_it():
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    first = request("r1", with_kv=False).model_copy(update={"sampling": SamplingParams(max_tokens=500)})
    assert isinstance(await handlers.on_decode(first), DecodeAccepted)
    await asyncio.sleep(0.02)
    resumed = first.model_copy(update={"attempt": 1, "resume_token_ids": (97, 97)})
    assert isinstance(await handlers.on_decode(resumed), DecodeAccepted)  # attempt 0 stopped first
    assert isinstance(await handlers.on_decode(resumed), ErrorReply)  # the same attempt again: a duplicate
    await handlers.on_cancel(CancelRequest(request_id="r1", worker_id="decode-1", attempt=0))  # came late
    await asyncio.sleep(0.02)
    assert "r1" in rt.engine.running and rt.num_in_flight == 1
    await handlers.on_cancel(CancelRequest(request_id="r1", worker_id="decode-1"))  # every attempt
    await asyncio.sleep(0.02)
    assert "r1" not in rt.engine.running and rt.num_in_flight == 0


async def test_an_early_cancel_of_an_earlier_attempt_does_not_refuse_the_later_one():
    rt = FakeRuntime()
    handlers = DecodeHandlers(rt)
    await handlers.on_cancel(CancelRequest(request_id="r2", worker_id="decode-1", attempt=0))
    later = request("r2", with_kv=False).model_copy(update={"attempt": 1, "resume_token_ids": (97,)})
    assert isinstance(await handlers.on_decode(later), DecodeAccepted)
    await handlers.on_cancel(CancelRequest(request_id="r3", worker_id="decode-1", attempt=1))
    assert isinstance(await handlers.on_decode(request("r3", with_kv=False)), ErrorReply)  # attempt 0 <= 1
    await handlers.on_cancel(CancelRequest(request_id="r2", worker_id="decode-1"))
