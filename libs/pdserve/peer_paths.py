"""Which prefill workers this worker cannot reach: learned once, not paid for again.

A pull whose connection to the prefill worker's transfer endpoint could not be made (kv.PeerUnreachable: a wrong
advertised address, no route, a firewall dropping the port, a link down) marks that prefill worker here. From
then on, until the mark clears:
- the worker's heartbeats list it (`Heartbeat.unreachable_peer_ids`), so routers stop pairing the two and
  `pdserve status` shows the pair; a heartbeat goes out at once when the set changes, not one interval later;
- a request routed here with that worker's KV anyway (sent before the router heard) skips the pull and
  recomputes at once instead of waiting for a connect deadline again.
A probe (a plain TCP connect to the endpoint, deadline connect_timeout_s) runs every probe_interval_s for each
marked worker; the first one that connects clears the mark. A mark whose probes keep failing is forgotten after
FORGET_AFTER_S (the worker is most likely gone; if not, the next failed pull marks it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

FORGET_AFTER_S = 600.0


@dataclass
class Mark:
    address: str  # the endpoint's tcp://host:port
    why: str
    since: float  # monotonic
    num_probes: int = 0


class PeerPaths:
    def __init__(self, worker_id: str, *, probe_interval_s: float, connect_timeout_s: float,
                 on_change: Callable[[], Awaitable[None]]):
        self.worker_id = worker_id
        self.probe_interval_s = probe_interval_s
        self.connect_timeout_s = connect_timeout_s
        self._on_change = on_change
        self._marks: dict[str, Mark] = {}  # prefill worker id -> why its endpoint cannot be reached
        self._prober: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()  # announcements, referenced until they ran
        self._stopped = False

    @property
    def unreachable_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._marks))

    def why_unreachable(self, peer_id: str) -> str | None:
        mark = self._marks.get(peer_id)
        return mark.why if mark is not None else None

    def mark(self, peer_id: str, address: str, why: str) -> None:
        """A connection to peer_id's endpoint at address could not be made (why)."""
        if peer_id in self._marks:
            return
        self._marks[peer_id] = Mark(address, why, time.monotonic())
        log.warning("%s: prefill worker %s at %s is unreachable from here (%s); routers are told, later requests "
                    "do not pull from it, and a probe every %.1fs clears the mark once it connects",
                    self.worker_id, peer_id, address, why, self.probe_interval_s)
        self._changed()
        if self._prober is None and not self._stopped:
            self._prober = asyncio.create_task(self._probe_every(), name="peer-path-probe")

    async def stop(self) -> None:
        self._stopped = True
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None

    def _changed(self) -> None:
        task = asyncio.create_task(self._notify())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _notify(self) -> None:
        try:
            await self._on_change()
        except Exception as e:  # the next regular heartbeat carries it anyway
            log.warning("%s: could not announce a changed path: %s", self.worker_id, e)

    async def _probe_every(self) -> None:
        while self._marks:
            await asyncio.sleep(self.probe_interval_s)
            marks = list(self._marks.items())
            results = await asyncio.gather(*(self._connects(mark.address) for _, mark in marks))
            changed = False
            for (peer_id, mark), error in zip(marks, results):
                mark.num_probes += 1
                if error is None:
                    del self._marks[peer_id]
                    changed = True
                    log.info("%s: prefill worker %s at %s is reachable again (probe connected after %.1fs); "
                             "its mark is cleared", self.worker_id, peer_id, mark.address,
                             time.monotonic() - mark.since)
                elif time.monotonic() - mark.since > FORGET_AFTER_S:
                    del self._marks[peer_id]
                    changed = True
                    log.info("%s: forgetting the mark on %s after %d failed probes (%s)", self.worker_id, peer_id,
                             mark.num_probes, error)
            if changed:
                self._changed()
        self._prober = None

    async def _connects(self, address: str) -> str | None:
        """None when a TCP connection to address can be made within connect_timeout_s, else why not."""
        parts = urlsplit(address)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port),
                                               self.connect_timeout_s)
        except asyncio.TimeoutError:
            return f"no connection within {self.connect_timeout_s:g}s"
        except OSError as e:
            return e.strerror or str(e)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
