"""Who is alive: workers publish heartbeats; every service that routes keeps a view of them.

A worker missing `subjects.HEARTBEAT_MISSES` heartbeats (by its own announced interval, timed with the
receiver's monotonic clock so clock skew does not matter) is gone; a clean shutdown says goodbye at once.
Silence heard while this service is itself cut off from NATS (a NATS restart) says nothing about the
members: nobody is declared gone then, and after the reconnect every member has its full allowance again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.protocol import Goodbye, Heartbeat

log = logging.getLogger(__name__)


class HeartbeatPublisher:
    """Publishes `make_heartbeat()` every interval until stop(), then a Goodbye."""

    def __init__(self, bus: Bus, make_heartbeat: Callable[[], Heartbeat], interval_s: float):
        self._bus = bus
        self._make = make_heartbeat
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.beat()  # be visible at once, not one interval later
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> None:
        hb = self._make()
        try:
            await self._bus.publish(subjects.heartbeat(hb.role, hb.worker_id), hb)
        except Exception as e:  # NATS down: keep beating; reconnect handles the rest
            log.warning("heartbeat of %s not sent: %s", hb.worker_id, e)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.beat()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        hb = self._make()
        try:
            await self._bus.publish(subjects.goodbye(hb.role, hb.worker_id), Goodbye(worker_id=hb.worker_id, role=hb.role))
            await self._bus.flush(timeout_s=2)
        except Exception as e:
            log.warning("goodbye of %s not sent: %s", hb.worker_id, e)


async def subscribe_membership(bus: Bus, on_heartbeat: Callable[[Heartbeat], Awaitable[None]],
                               on_goodbye: Callable[[Goodbye], Awaitable[None]]) -> None:
    """Follow every heartbeat and goodbye; one that names another sender than its subject does is dropped
    (NATS permissions say which role may publish on which subject: see nats_auth.py)."""
    await bus.subscribe(subjects.HEARTBEAT_ALL, Heartbeat, on_heartbeat,
                        subject_of=lambda hb: subjects.heartbeat(hb.role, hb.worker_id))
    await bus.subscribe(subjects.GOODBYE_ALL, Goodbye, on_goodbye,
                        subject_of=lambda bye: subjects.goodbye(bye.role, bye.worker_id))


@dataclass
class Member:
    heartbeat: Heartbeat
    last_seen: float  # monotonic

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last_seen <= subjects.HEARTBEAT_MISSES * self.heartbeat.interval_s


class Membership:
    """The live view of workers and brokers, from heartbeats and goodbyes."""

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self.on_join: list[Callable[[Heartbeat], None]] = []
        self.on_gone: list[Callable[[str], None]] = []
        # A member's heartbeat says it reconnected to NATS: messages to and from it just before may be lost.
        self.on_reconnected: list[Callable[[str], None]] = []
        self._pruner: asyncio.Task | None = None
        self._bus: Bus | None = None
        self._num_reconnects = 0  # of our own NATS connection, at the last prune

    async def start(self, bus: Bus, *, prune_interval_s: float = 0.5) -> None:
        """Follow heartbeats and goodbyes; check for silent members every prune_interval_s, so that on_gone
        fires within about one interval of the last missed heartbeat even when nobody asks for the view
        (a request streaming from a worker that was killed -9 learns of it that way)."""
        self._bus = bus
        await subscribe_membership(bus, self._on_heartbeat, self._on_goodbye)
        self._pruner = asyncio.create_task(self._prune_every(prune_interval_s), name="membership-prune")

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None

    async def _prune_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.prune()
            except Exception:  # a failing on_gone callback must not stop the watch
                log.exception("membership: prune failed")

    async def _on_heartbeat(self, hb: Heartbeat) -> None:
        known = self._members.get(hb.worker_id)
        joined = known is None
        self._members[hb.worker_id] = Member(hb, time.monotonic())
        if known is not None and hb.num_reconnects > known.heartbeat.num_reconnects:
            log.info("%s %s reconnected to NATS", hb.role, hb.worker_id)
            for callback in self.on_reconnected:
                callback(hb.worker_id)
        if joined:
            log.info("%s %s joined (model %s, transfer %s)", hb.role, hb.worker_id,
                     hb.model.name if hb.model else "-", hb.transfer_address)
            for callback in self.on_join:
                callback(hb)

    async def _on_goodbye(self, bye: Goodbye) -> None:
        if self._members.pop(bye.worker_id, None) is not None:
            log.info("%s %s left (goodbye)", bye.role, bye.worker_id)
            self._notify_gone(bye.worker_id)

    def _notify_gone(self, worker_id: str) -> None:
        for callback in self.on_gone:
            callback(worker_id)

    def prune(self) -> None:
        """Forget members that missed their heartbeats, unless we could not have heard them."""
        if self._bus is not None:
            if not self._bus.connected:
                return
            if self._bus.num_reconnects != self._num_reconnects:  # count their silence from the reconnect on
                self._num_reconnects = self._bus.num_reconnects
                now = time.monotonic()
                for member in self._members.values():
                    member.last_seen = max(member.last_seen, now)
        for worker_id, member in list(self._members.items()):
            if not member.alive:
                del self._members[worker_id]
                log.warning("%s %s is gone: no heartbeat for %.1fs", member.heartbeat.role, worker_id,
                            time.monotonic() - member.last_seen)
                self._notify_gone(worker_id)

    def live(self, role: str | None = None, model: str | None = None) -> list[Heartbeat]:
        self.prune()
        return [
            m.heartbeat for m in self._members.values()
            if (role is None or m.heartbeat.role == role)
            and (model is None or (m.heartbeat.model is not None and m.heartbeat.model.name == model))
        ]

    def get(self, worker_id: str) -> Heartbeat | None:
        self.prune()
        member = self._members.get(worker_id)
        return member.heartbeat if member else None
