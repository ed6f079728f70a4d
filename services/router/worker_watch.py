"""Answers from workers that may die meanwhile: a wait on a worker ends as soon as it is declared gone.

A prefill deadline is long (a minute): a worker killed -9 must not cost all of it. Membership declares a
worker gone after it missed its heartbeats; every request still waiting on it then moves on at once. After
this router's own NATS connection came back, or the worker's did (its heartbeat counts its reconnects), a
request or reply in flight then may be lost: a wait then lasts only as long as a silent worker takes to be
declared gone, not the request's whole deadline.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from pdserve import subjects
from pdserve.bus import BusError
from pdserve.membership import Membership

T = TypeVar("T")

# The least a wait lasts after a reconnect, for a worker whose heartbeat interval is unknown.
MIN_RECONNECT_GRACE_S = 0.25


class WorkerGone(BusError):
    """The worker a request waits on missed its heartbeats: its answer will not come."""


class WorkerWatch:
    def __init__(self, membership: Membership):
        self.membership = membership
        self._gone_waiters: dict[str, set[asyncio.Future]] = {}  # worker_id -> requests waiting on its answer
        self._reconnect_waiters: set[asyncio.Future] = set()  # requests waiting on an answer over NATS
        self._worker_reconnect_waiters: dict[str, set[asyncio.Future]] = {}  # worker_id -> the same, per worker

    def silence_allowance_s(self, worker_id: str) -> float:
        """How long a worker may stay silent before membership declares it gone."""
        hb = self.membership.get(worker_id)
        return subjects.HEARTBEAT_MISSES * hb.interval_s if hb else 0.0

    async def unless_gone(self, worker_id: str, request: Awaitable[T]) -> T:
        """request's answer, or WorkerGone as soon as worker_id is declared gone (its request is dropped), or
        when this router reconnected to NATS meanwhile and no answer came within the silence allowance."""
        if self.membership.get(worker_id) is None:  # it left after the request was routed to it
            if asyncio.iscoroutine(request):
                request.close()
            raise WorkerGone(f"worker {worker_id} has left (goodbye or missed heartbeats) since it was chosen")
        loop = asyncio.get_running_loop()
        gone, reconnected = loop.create_future(), loop.create_future()
        waiters = self._gone_waiters.setdefault(worker_id, set())
        waiters.add(gone)
        self._reconnect_waiters.add(reconnected)
        self._worker_reconnect_waiters.setdefault(worker_id, set()).add(reconnected)
        answer = asyncio.ensure_future(request)
        try:
            await asyncio.wait((answer, gone, reconnected), return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and not gone.done():
                grace_s = max(self.silence_allowance_s(worker_id), MIN_RECONNECT_GRACE_S)
                await asyncio.wait((answer, gone), timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
                if not answer.done() and not gone.done():
                    raise WorkerGone(f"no answer from worker {worker_id} within {grace_s:.1f}s after it or the "
                                     "router reconnected to NATS (the request or its answer was lost meanwhile)")
            if not answer.done():
                raise WorkerGone(f"worker {worker_id} is gone (goodbye or missed heartbeats)")
            return answer.result()
        finally:
            if not answer.done():  # its reply is of no use any more; nor its error, should it still come
                answer.cancel()
                answer.add_done_callback(lambda task: task.cancelled() or task.exception())
            waiters.discard(gone)
            self._reconnect_waiters.discard(reconnected)
            per_worker = self._worker_reconnect_waiters.get(worker_id)
            if per_worker is not None:
                per_worker.discard(reconnected)
                if not per_worker:
                    del self._worker_reconnect_waiters[worker_id]
            if not waiters and self._gone_waiters.get(worker_id) is waiters:
                del self._gone_waiters[worker_id]

    def on_worker_gone(self, worker_id: str) -> None:
        for gone in self._gone_waiters.pop(worker_id, ()):
            if not gone.done():
                gone.set_result(None)

    def on_reconnect(self) -> None:
        for reconnected in list(self._reconnect_waiters):
            if not reconnected.done():
                reconnected.set_result(None)

    def on_worker_reconnected(self, worker_id: str) -> None:
        """worker_id's NATS connection was made again (its heartbeat says): a request to it, or its answer, may
        have been lost with the old connection; waits on it get the same grace as after our own reconnect."""
        for reconnected in list(self._worker_reconnect_waiters.get(worker_id, ())):
            if not reconnected.done():
                reconnected.set_result(None)
