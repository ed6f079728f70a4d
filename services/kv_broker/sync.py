"""When the broker's view of a worker's blocks may be wrong, and a snapshot must be asked for.

Core NATS delivers at most once: an event lost while NATS restarted, or sent while this broker was down,
leaves the index wrong until the worker re-sends everything it holds (a snapshot, on KVResync). Three
signs of that, per worker:
- a gap in its events' `seq` (1, 2, 3, ... per worker; a snapshot's cleared event restarts the count);
- its first numbered event is not 1 and not a snapshot (this broker started after the worker);
- its heartbeats carry the seq of its last published event (`kv_event_seq`): still behind the seq a
  heartbeat announced one heartbeat earlier means events were lost with nothing after them to show a gap.
A broker that starts asks every worker at once (Broker.start), so rebuilding does not wait for these.
Asking again for the same worker waits RETRY_S, so a snapshot in flight is not asked for twice.
"""

from __future__ import annotations

import time

from pdserve.protocol import Heartbeat, KVEvent

RETRY_S = 2.0


class EventSequences:
    def __init__(self, retry_s: float = RETRY_S) -> None:
        self._retry_s = retry_s
        self._applied: dict[str, int] = {}  # worker_id -> seq of the last event applied
        self._announced: dict[str, int] = {}  # worker_id -> kv_event_seq of its last heartbeat
        self._asked_at: dict[str, float] = {}  # worker_id -> when a snapshot was last asked for (monotonic)
        self.num_gaps = 0

    def on_event(self, event: KVEvent) -> bool:
        """Record an applied event; True when a snapshot should be asked for."""
        if event.seq == 0:
            return False
        worker_id = event.worker_id
        last = self._applied.get(worker_id)
        self._applied[worker_id] = event.seq
        if event.cleared:
            self._asked_at.pop(worker_id, None)
            return False
        if event.seq == (last or 0) + 1:
            return False
        self.num_gaps += 1
        return self._ask(worker_id)

    def on_heartbeat(self, hb: Heartbeat) -> bool:
        """True when the worker published events more than a heartbeat ago that were never applied here."""
        earlier = self._announced.get(hb.worker_id)
        self._announced[hb.worker_id] = hb.kv_event_seq
        if earlier is None or self._applied.get(hb.worker_id, 0) >= earlier:
            return False
        return self._ask(hb.worker_id)

    def _ask(self, worker_id: str) -> bool:
        now = time.monotonic()
        if now - self._asked_at.get(worker_id, float("-inf")) < self._retry_s:
            return False
        self._asked_at[worker_id] = now
        return True

    def forget(self, worker_id: str) -> None:
        for book in (self._applied, self._announced, self._asked_at):
            book.pop(worker_id, None)

    def applied(self, worker_id: str) -> int:
        return self._applied.get(worker_id, 0)
