"""Which prefill and decode worker gets a request: KVAwarePolicy (blocks to recompute weighed against load,
conditional disaggregation) over LeastLoadPolicy (load alone).

Load of a worker = the larger of what its last heartbeat reported (queued + running, all routers) and what
this router has sent it and not yet seen end (fresher than a heartbeat). Requests of this router that the
heartbeat showed and that have ended since are taken off what it reported: a heartbeat is up to one interval
old, and a worker that has just finished a request must not look busy until its next one. Ties are broken at
random so equal workers share the work.

The same loads give the wait a new prefill can expect (`prefill_wait_s`), which the router uses to refuse
early a request whose deadline cannot be met.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from pdserve.membership import Membership
from pdserve.protocol import Heartbeat


class LeastLoadPolicy:
    def __init__(self, membership: Membership, rng: random.Random | None = None):
        self._membership = membership
        self._rng = rng or random.Random()
        self.in_flight: Counter[str] = Counter()
        # worker id -> (its heartbeat, how many of this router's requests it showed have ended since it came)
        self._ended: dict[str, tuple[Heartbeat, int]] = {}
        self.prefill_time = ServiceTime()

    def reported(self, hb: Heartbeat) -> tuple[int, int]:
        """(queued, running) of the heartbeat less this router's requests that ended since it was received
        (taken off running first: a request ends running)."""
        ended = self.ended_since(hb)
        running = max(0, hb.num_running - ended)
        queued = max(0, hb.num_queued - max(0, ended - hb.num_running))
        return queued, running

    def ended_since(self, hb: Heartbeat) -> int:
        entry = self._ended.get(hb.worker_id)
        return entry[1] if entry is not None and entry[0] is hb else 0  # a newer heartbeat shows the truth

    def load(self, hb: Heartbeat) -> int:
        return max(sum(self.reported(hb)), self.in_flight[hb.worker_id])

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

    def acquire(self, worker_id: str) -> Heartbeat | None:
        """A request was sent to worker_id; returns the worker's heartbeat at that moment, for release."""
        self.in_flight[worker_id] += 1
        return self._membership.get(worker_id)

    def release(self, worker_id: str, heartbeat_at_acquire: Heartbeat | None = None) -> None:
        """The request sent to worker_id ended. If a heartbeat came while it ran, that heartbeat counts it:
        note that it has ended, until the next heartbeat."""
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]
        current = self._membership.get(worker_id)
        if current is None:
            self._ended.pop(worker_id, None)
        elif current is not heartbeat_at_acquire:
            hb, num_ended = self._ended.get(worker_id, (None, 0))
            self._ended[worker_id] = (current, num_ended + 1 if hb is current else 1)


class ServiceTime:
    """Exponentially weighted mean of how long one request occupies a worker (seconds); None until observed."""

    def __init__(self, weight: float = 0.2):
        assert 0 < weight <= 1
        self.weight = weight
        self.mean_s: float | None = None

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.mean_s = seconds if self.mean_s is None else self.mean_s + self.weight * (seconds - self.mean_s)


ROUTING_MODES = ("kv", "least_load", "round_robin")


@dataclass(frozen=True)
class CostWeights:
    """Weights of KVAwarePolicy's cost, in blocks of prefill work: one prompt block to recompute costs
    `recompute`; a queued request, a running one and a full KV cache cost the rest."""

    recompute: float = 1.0
    queue: float = 8.0
    running: float = 4.0
    kv: float = 16.0


def route_cost(weights: CostWeights, num_prompt_blocks: int, num_matched_blocks: int, num_queued: int,
               num_running: int, kv_usage: float) -> float:
    """cost = w_recompute x (prompt_blocks - matched_blocks) + w_queue x num_queued + w_running x num_running
    + w_kv x kv_usage (0..1)."""
    return (weights.recompute * max(0, num_prompt_blocks - num_matched_blocks) + weights.queue * num_queued
            + weights.running * num_running + weights.kv * kv_usage)


@dataclass
class RoutePlan:
    """Where a request goes. prefill None: the decode worker prefills itself (reason says why).

    reason: cache_hit (the decode worker holds every full block of the prompt), local_prefill (what is left
    to compute after the decode worker's cache hit is under local_prefill_max_tokens), prefill_queues_full
    (every prefill worker's load is at prefill_queue_limit), no_prefill_worker (none is alive: decode serves
    alone), prefill_unreachable (no decode worker can pull from any live prefill worker: see
    Heartbeat.unreachable_peer_ids), prefix_hit (the prefill worker was chosen with some of the prompt cached),
    load (nothing cached anywhere that mattered: load alone decided).
    kv_lookup: ok, timeout, error, no_broker, off (routing is not "kv" or the prompt has no full block).
    """

    reason: str
    decode: Heartbeat
    prefill: Heartbeat | None
    num_prompt_blocks: int
    matched: Mapping[str, int]
    kv_lookup: str = "off"
    # Who holds how many of the prompt's leading blocks, from the lookup whatever the routing mode (prefix reuse
    # pulls from them); `matched` is what the policy weighed, empty outside "kv" routing.
    cached_by: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # Of those, how many only the worker's host-memory tier holds (a memory copy away, not a prefill).
    host_cached_by: Mapping[str, int] = dataclasses.field(default_factory=dict)
    block_hashes: tuple[int, ...] = ()

    def num_matched_blocks(self, hb: Heartbeat | None) -> int:
        return self.matched.get(hb.worker_id, 0) if hb is not None else 0

    def attributes(self) -> dict:
        return {"route_reason": self.reason, "kv_lookup": self.kv_lookup, "num_prompt_blocks": self.num_prompt_blocks,
                "route_prefill_worker_id": self.prefill.worker_id if self.prefill else "",
                "route_decode_worker_id": self.decode.worker_id,
                "prefill_num_matched_blocks": self.num_matched_blocks(self.prefill),
                "prefill_num_host_tier_blocks": self.num_host_blocks(self.prefill),
                "decode_num_matched_blocks": self.num_matched_blocks(self.decode)}

    def num_host_blocks(self, hb: Heartbeat | None) -> int:
        return self.host_cached_by.get(hb.worker_id, 0) if hb is not None else 0


class KVAwarePolicy(LeastLoadPolicy):
    """Chooses workers by the cost of serving the request there (mode "kv"), by load alone ("least_load",
    LeastLoadPolicy), or in turn ("round_robin", for comparisons).

    cost(worker) = w_recompute x (num_prompt_blocks - num_matched_blocks[worker])
                 + w_queue x num_queued + w_running x num_running + w_kv x kv_usage
    num_matched_blocks: leading prompt blocks the worker holds (the KV broker's lookup); num_queued,
    num_running, kv_usage: its last heartbeat, where requests this router sent it and the heartbeat does not
    show yet count as queued, and those it showed that have ended since do not count. The lowest cost wins; ties are broken at random.

    `plan` applies it to both roles, with conditional disaggregation: the decode worker D of lowest cost
    (its own cache hit counted) prefills the request itself when it holds the whole prompt, when what is left
    to compute is under local_prefill_max_tokens, or when every prefill worker's load is at
    prefill_queue_limit (0 turns either threshold off); otherwise the prefill worker of lowest cost prefills
    and the decode worker of lowest load (it pulls the KV, its cache does not matter) decodes. Only pairs that
    work are planned: a decode worker that marked a prefill worker unreachable (its heartbeat says so) is not
    given that worker's KV; with no working pair, or no prefill worker at all, D prefills itself.
    """

    def __init__(self, membership: Membership, weights: CostWeights = CostWeights(), mode: str = "kv",
                 local_prefill_max_tokens: int = 0, prefill_queue_limit: int = 0, rng: random.Random | None = None):
        super().__init__(membership, rng)
        assert mode in ROUTING_MODES, mode
        self.weights = weights
        self.mode = mode
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.prefill_queue_limit = prefill_queue_limit
        self._turn: Counter[tuple[str, str]] = Counter()

    def cost(self, hb: Heartbeat, num_prompt_blocks: int = 0, num_matched_blocks: int = 0) -> float:
        queued, running = self.reported(hb)
        unseen = max(0, self.in_flight[hb.worker_id] - queued - running)
        return route_cost(self.weights, num_prompt_blocks, num_matched_blocks, queued + unseen, running,
                          hb.kv_usage)

    def choose(self, role: str, model: str, exclude: Iterable[str] = (), num_prompt_blocks: int = 0,
               matched: Mapping[str, int] | None = None) -> Heartbeat | None:
        if self.mode == "least_load":
            return super().choose(role, model, exclude)
        excluded = set(exclude)
        candidates = [hb for hb in self._membership.live(role, model) if hb.worker_id not in excluded]
        if not candidates:
            return None
        if self.mode == "round_robin":
            candidates.sort(key=lambda hb: hb.worker_id)
            turn = self._turn[(role, model)]
            self._turn[(role, model)] += 1
            return candidates[turn % len(candidates)]
        matched = matched or {}
        return min(candidates, key=lambda hb: (self.cost(hb, num_prompt_blocks, matched.get(hb.worker_id, 0)),
                                               self._rng.random()))

    def prefill_queues_full(self, model: str) -> bool:
        candidates = self._membership.live("prefill", model)
        return (self.prefill_queue_limit > 0 and bool(candidates)
                and all(self.load(hb) >= self.prefill_queue_limit for hb in candidates))

    def plan(self, model: str, num_prompt_tokens: int, block_size: int, matched: Mapping[str, int],
             kv_lookup: str = "off") -> RoutePlan | None:
        """The route of a request (see the class docstring); None while no decode worker serves model."""
        num_prompt_blocks = num_prompt_tokens // block_size
        local = self.choose("decode", model, num_prompt_blocks=num_prompt_blocks, matched=matched)
        if local is None:
            return None
        num_left = num_prompt_tokens - matched.get(local.worker_id, 0) * block_size

        def plan(reason: str, decode: Heartbeat, prefill: Heartbeat | None = None) -> RoutePlan:
            return RoutePlan(reason, decode, prefill, num_prompt_blocks, matched, kv_lookup)

        if num_prompt_blocks > 0 and matched.get(local.worker_id, 0) >= num_prompt_blocks:
            return plan("cache_hit", local)
        if num_left < self.local_prefill_max_tokens:
            return plan("local_prefill", local)
        if self.prefill_queues_full(model):
            return plan("prefill_queues_full", local)
        prefill = self.choose("prefill", model, num_prompt_blocks=num_prompt_blocks, matched=matched)
        if prefill is None:
            return plan("no_prefill_worker", local)
        decode = self.choose("decode", model) if self.mode == "kv" and matched else local
        if not reaches(decode, prefill.worker_id):
            decode = self.choose_decode_reaching(model, prefill.worker_id)
            if decode is None:  # nobody pulls from that one: a prefill worker the local one reaches, or none
                decode = local
                prefill = self.choose("prefill", model, exclude=local.unreachable_peer_ids,
                                      num_prompt_blocks=num_prompt_blocks, matched=matched)
                if prefill is None:
                    return plan("prefill_unreachable", local)
        return plan("prefix_hit" if matched.get(prefill.worker_id, 0) > 0 else "load", decode, prefill)

    def choose_decode_reaching(self, model: str, prefill_worker_id: str,
                               exclude: Iterable[str] = ()) -> Heartbeat | None:
        """The decode worker of lowest load among those that have not marked prefill_worker_id unreachable."""
        cannot = [hb.worker_id for hb in self._membership.live("decode", model)
                  if not reaches(hb, prefill_worker_id)]
        return self.choose("decode", model, exclude=[*exclude, *cannot])


def reaches(decode: Heartbeat, prefill_worker_id: str) -> bool:
    """Whether decode can pull from prefill_worker_id as far as anyone knows (it has not marked it unreachable)."""
    return prefill_worker_id not in decode.unreachable_peer_ids
