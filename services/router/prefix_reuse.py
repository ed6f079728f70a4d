"""Prefix reuse across workers: a prefill worker that lacks leading blocks of a prompt that another worker's cache
holds pulls them from that worker instead of computing them, when pulling is estimated to be faster.

Algorithm, per request, once its prefill worker P is chosen: from the broker's lookup (RoutePlan.cached_by), the
live prefill worker Q other than P that holds the most leading blocks, if it holds more than P does and both
engines take part (Heartbeat.reuses_peer_prefixes). The blocks P would pull, n, cost n x block bytes over the pull
bandwidth (measured from prefix pulls, kv_pull_gbps_estimate until one was seen) against n x block_size tokens at
the prefill rate (measured from KV-ready answers: compute time per computed token; none seen yet: pull). If pulling
wins, Q is asked to hold those blocks for one pull (a lease with a transfer token, within prefix_lease_timeout_s);
its answer rides in P's prefill request, and P releases the lease on Q once it pulled or gave up. A lease refused,
late or empty, or a pull that fails, costs only the computing the request would have done anyway.
"""

from __future__ import annotations

import logging
import time

from pdserve import subjects
from pdserve.bus import Bus, BusError
from pdserve.config import RouterConfig
from pdserve.membership import Membership
from pdserve.protocol import KVReady, KVTransferParams, ModelCard, PrefixLease, PrefixLeaseRequest
from services.router.backend import GenerateRequest
from services.router.policy import RoutePlan

log = logging.getLogger(__name__)

EWMA_WEIGHT = 0.2  # of a new observation
MIN_TIMED_TOKENS = 16  # fewer computed tokens than this say little about a worker's prefill rate


class PrefixReuse:
    def __init__(self, config: RouterConfig, bus: Bus, membership: Membership):
        self.config = config
        self.bus = bus
        self.membership = membership
        self.pull_gbps = config.kv_pull_gbps_estimate
        self.ms_per_prompt_token: float | None = None  # measured across prefill workers

    def observe(self, ready: KVReady) -> None:
        """Learn the prefill rate and the prefix pull bandwidth from a KV-ready answer."""
        computed = ready.num_prompt_tokens - ready.num_cached_tokens - ready.num_peer_loaded_tokens
        compute_ms = ready.prefill_ms - ready.queue_ms - ready.peer_load_ms
        if computed >= MIN_TIMED_TOKENS and compute_ms > 0:
            self.ms_per_prompt_token = _ewma(self.ms_per_prompt_token, compute_ms / computed)
        if ready.num_peer_loaded_bytes > 0 and ready.peer_load_ms > 0:
            self.pull_gbps = _ewma(self.pull_gbps, ready.num_peer_loaded_bytes / ready.peer_load_ms / 1e6)

    def source(self, plan: RoutePlan, prefill_worker_id: str, card: ModelCard,
               num_prompt_tokens: int) -> tuple[str, int] | None:
        """(the worker to pull from, how many of the prompt's leading blocks to pull from it), or None: compute
        them."""
        if not self.config.kv_prefix_reuse or not plan.cached_by:
            return None
        me = self.membership.get(prefill_worker_id)
        if me is None or not me.reuses_peer_prefixes:
            return None
        mine = plan.cached_by.get(prefill_worker_id, 0)
        # Never the block of the prompt's last token: that token is computed anyway (its logits choose the first).
        most = (num_prompt_tokens - 1) // card.kv_layout.block_size
        peers = [(min(n, most), worker_id) for worker_id, n in plan.cached_by.items() if worker_id != prefill_worker_id]
        peers = [(n, worker_id) for n, worker_id in peers if n > mine]
        for n, worker_id in sorted(peers, reverse=True):
            hb = self.membership.get(worker_id)
            if hb is not None and hb.role == "prefill" and hb.reuses_peer_prefixes and hb.model.name == card.name:
                return (worker_id, n) if self._pull_wins(n - mine, card) else None
        return None

    def _pull_wins(self, num_blocks: int, card: ModelCard) -> bool:
        if self.ms_per_prompt_token is None:
            return True  # no prefill timed yet: a pull beats computing by orders of magnitude on every path measured
        pull_ms = num_blocks * card.kv_layout.bytes_per_block / (self.pull_gbps * 1e6)
        compute_ms = num_blocks * card.kv_layout.block_size * self.ms_per_prompt_token
        return pull_ms < compute_ms

    async def lease(self, req: GenerateRequest, plan: RoutePlan, source_id: str, num_blocks: int,
                    block_size: int) -> KVTransferParams | None:
        """The source's lease of the prompt's leading blocks, or None (refused, late, nothing cached any more)."""
        timeout_s = max(0.001, min(self.config.prefix_lease_timeout_s, req.remaining_s()))
        num_tokens = num_blocks * block_size
        msg = PrefixLeaseRequest(request_id=req.request_id, model=req.model, block_hashes=plan.block_hashes[:num_blocks],
                                 prefix_token_ids=tuple(req.prompt_token_ids[:num_tokens]),
                                 deadline=time.time() + timeout_s)
        try:
            reply = await self.bus.request(subjects.prefix_lease(source_id), msg, PrefixLease, timeout_s=timeout_s,
                                           request_id=req.request_id)
        except BusError as e:
            log.info("request %s: %s did not hold its cached prefix (%s); the prefix is computed", req.request_id,
                     source_id, e)
            return None
        return reply.kv_transfer_params


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new
