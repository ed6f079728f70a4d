"""Where a request goes: the KV broker's lookup (which workers hold how many of the prompt's leading blocks)
combined with the workers' load by KVAwarePolicy.plan. A lookup that fails or comes late (deadline
kv_lookup_timeout_s) leaves load alone to decide: a request never fails for its lookup. One log line says
where and why; the caller puts the plan's attributes on the "route" span."""

from __future__ import annotations

import dataclasses
import logging
import time

from pdserve import subjects
from pdserve.throttled_log import ThrottledLog
from pdserve.bus import Bus, BusTimeout
from pdserve.config import RouterConfig
from pdserve.kv.hashing import block_hashes
from pdserve.membership import Membership
from pdserve.metrics import RouterMetrics
from pdserve.protocol import KVLookup, KVLookupReply, ModelCard
from services.router.backend import GenerateRequest
from services.router.errors import NoWorkerError
from services.router.policy import KVAwarePolicy, RoutePlan

log = logging.getLogger(__name__)

# Routes that work around a missing or unreachable prefill tier: served, but operators must hear of it.
DEGRADED_REASONS = {
    "no_prefill_worker": "no live prefill worker: decode workers serve whole requests; start a prefill worker",
    "prefill_unreachable": "no decode worker can pull from any live prefill worker (see `pdserve status`, "
                           "unreachable peers): decode workers prefill themselves; fix the path (address, route, firewall)",
}


class RoutePlanner:
    def __init__(self, config: RouterConfig, bus: Bus, membership: Membership, policy: KVAwarePolicy,
                 metrics: RouterMetrics):
        self.config = config
        self.bus = bus
        self.membership = membership
        self.policy = policy
        self.metrics = metrics
        self._degraded_log = ThrottledLog(log, burst=1, period_s=10.0)

    async def plan(self, req: GenerateRequest, card: ModelCard) -> RoutePlan:
        block_size = card.kv_layout.block_size
        started = time.perf_counter()
        hashes, cached_by, host_cached_by, kv_lookup = await self._lookup(req, block_size)
        looked_up = time.perf_counter()
        matched = cached_by if self.config.routing == "kv" else {}
        plan = self.policy.plan(req.model, len(req.prompt_token_ids), block_size, matched, kv_lookup)
        if plan is None:
            raise NoWorkerError(f"no live decode worker serves model {req.model!r}")
        plan = dataclasses.replace(plan, cached_by=cached_by, host_cached_by=host_cached_by, block_hashes=hashes)
        decided = time.perf_counter()
        self.metrics.route_seconds.observe(decided - started)
        if kv_lookup in ("ok", "timeout", "error"):
            self.metrics.kv_lookup_seconds.observe(looked_up - started)
        self.metrics.route_decisions.labels(reason=plan.reason).inc()
        if plan.prefill is None:
            self.metrics.local_prefills.inc()
        if plan.reason in DEGRADED_REASONS:
            self._degraded_log.warning("request %s: %s", req.request_id, DEGRADED_REASONS[plan.reason])
        log.info("request %s: route %s: prefill %s (%d of %d blocks cached, %d in host memory), decode %s (%d cached); "
                 "kv lookup %s %.3f ms, decided in %.3f ms", req.request_id, plan.reason,
                 plan.prefill.worker_id if plan.prefill else "none (decode prefills)",
                 plan.num_matched_blocks(plan.prefill), plan.num_prompt_blocks, plan.num_host_blocks(plan.prefill),
                 plan.decode.worker_id,
                 plan.num_matched_blocks(plan.decode), kv_lookup, (looked_up - started) * 1000,
                 (decided - started) * 1000)
        return plan

    async def _lookup(self, req: GenerateRequest,
                      block_size: int) -> tuple[tuple[int, ...], dict[str, int], dict[str, int], str]:
        """(the prompt's block hashes, worker_id -> leading prompt blocks it holds, worker_id -> how many of those
        only its host tier holds, how the lookup went): ok, timeout, error, no_broker, off."""
        # Prefix reuse needs to know who holds the prompt's blocks whatever the routing mode.
        if (self.config.routing != "kv" and not self.config.kv_prefix_reuse) or len(req.prompt_token_ids) < block_size:
            return (), {}, {}, "off"
        if not self.membership.live("broker"):
            return (), {}, {}, "no_broker"
        hashes = tuple(block_hashes(req.prompt_token_ids, block_size))
        msg = KVLookup(model=req.model, block_hashes=hashes)
        timeout_s = max(0.001, min(self.config.kv_lookup_timeout_s, req.remaining_s()))
        try:
            reply = await self.bus.request(subjects.KV_LOOKUP, msg, KVLookupReply, request_id=req.request_id,
                                           timeout_s=timeout_s)
            return hashes, dict(reply.num_matched_blocks), dict(reply.num_matched_host_blocks), "ok"
        except BusTimeout:
            log.warning("request %s: no KV lookup answer within %.3fs; routing by load", req.request_id,
                        self.config.kv_lookup_timeout_s)
            return hashes, {}, {}, "timeout"
        except Exception as e:  # never fail a request for its lookup: load alone decides
            log.warning("request %s: KV lookup failed (%s); routing by load", req.request_id, e)
            return hashes, {}, {}, "error"
