"""Which prefill and decode worker gets a request: least load for now (KV-aware routing comes later).

Load of a worker = the larger of what its last heartbeat reported (queued + running, all routers) and what
this router has sent it and not yet seen end (fresher than a heartbeat). Ties are broken at random so
equal workers share the work.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable

from pdserve.membership import Membership
from pdserve.protocol import Heartbeat


class LeastLoadPolicy:
    def __init__(self, membership: Membership, rng: random.Random | None = None):
        self._membership = membership
        self._rng = rng or random.Random()
        self.in_flight: Counter[str] = Counter()

    def load(self, hb: Heartbeat) -> int:
        return max(hb.num_queued + hb.num_running, self.in_flight[hb.worker_id])

    def choose(self, role: str, model: str, exclude: Iterable[str] = ()) -> Heartbeat | None:
        excluded = set(exclude)
        candidates = [hb for hb in self._membership.live(role, model) if hb.worker_id not in excluded]
        if not candidates:
            return None
        return min(candidates, key=lambda hb: (self.load(hb), self._rng.random()))

    def acquire(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1

    def release(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]
