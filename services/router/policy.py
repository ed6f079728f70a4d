"""Which prefill and decode worker gets a request: least load for now (KV-aware routing comes later).

Load of a worker = the larger of what its last heartbeat reported (queued + running, all routers) and what
this router has sent it and not yet seen end (fresher than a heartbeat). Ties are broken at random so
equal workers share the work.

The same loads give the wait a new prefill can expect (`prefill_wait_s`), which the router uses to refuse
early a request whose deadline cannot be met.
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
        self.prefill_time = ServiceTime()

    def load(self, hb: Heartbeat) -> int:
        return max(hb.num_queued + hb.num_running, self.in_flight[hb.worker_id])

    def choose(self, role: str, model: str, exclude: Iterable[str] = ()) -> Heartbeat | None:
        excluded = set(exclude)
        candidates = [hb for hb in self._membership.live(role, model) if hb.worker_id not in excluded]
        if not candidates:
            return None
        return min(candidates, key=lambda hb: (self.load(hb), self._rng.random()))

    def prefill_wait_s(self, model: str) -> float | None:
        """How long a new prefill would wait on the least-loaded prefill worker; None while unknown.

        Estimate: load x mean prefill service time. Prefill is compute-bound and a worker runs its prompts
        about one at a time, so a new one waits for everything ahead of it (the one computing counts as a
        whole prefill: pessimistic by at most one). The mean is what this router observed (compute time
        the workers reported, without their queue wait). Engines that batch prefills and do not report
        their queue wait (vLLM) inflate the observed time under concurrency, which makes the estimate
        pessimistic; the router refuses only when even it exceeds the time a request has left.
        """
        mean_s = self.prefill_time.mean_s
        candidates = self._membership.live("prefill", model)
        if mean_s is None or not candidates:
            return None
        return min(self.load(hb) for hb in candidates) * mean_s

    def acquire(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1

    def release(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]


class ServiceTime:
    """Exponentially weighted mean of how long one request occupies a worker (seconds); None until observed."""

    def __init__(self, weight: float = 0.2):
        assert 0 < weight <= 1
        self.weight = weight
        self.mean_s: float | None = None

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.mean_s = seconds if self.mean_s is None else self.mean_s + self.weight * (seconds - self.mean_s)
