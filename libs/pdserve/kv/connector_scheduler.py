"""The scheduler half of pdserve's vLLM KV connector: plans decode's loads and prefill's holds.

vLLM calls it in the EngineCore process, where its scheduler and block pool live; it never touches KV bytes
and imports nothing of the transfer data plane, so it is kept apart from the worker half (connector_worker.py),
which runs in another process. PdserveConnector (vllm_connector.py) delegates to it on the SCHEDULER role.

Decode: get_num_new_matched_tokens offers the remote prompt KV as an asynchronous load and
update_state_after_alloc turns the offer into a LoadSpec for the worker half, with the blocks vLLM allocated.
Prefill: request_finished keeps a finished request's blocks (a reference on them in vLLM's block pool in
"refcount" mode, vLLM's delay_free in the other) and hands out the KVTransferParams; the blocks are freed when
the worker half reports the hold released, or here at lease end.
Host-memory tier (kv_connector_extra_config["host_cache_gib"]): every finished request's full blocks are copied
there, and a prompt's blocks found there past vLLM's own hit are offered as a synchronous load that copies them back
(connector_host_tier.py).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pdserve import tracecontext
from pdserve.kv.connector_metadata import (
    HoldSpec,
    LoadSpec,
    PdserveConnectorMetadata,
    PdserveHandshake,
    PdserveWorkerMetadata,
)
from pdserve.kv.connector_host_tier import HostTierPlanner, tier_size
from pdserve.kv.connector_stats import PoolUsagePublisher, pool_stats_path
from pdserve.protocol import KVLayout, KVTransferParams

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool as VllmBlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request


logger = logging.getLogger(__name__)


@dataclass
class _LoadPlan:
    params: KVTransferParams | None
    error: str | None
    num_computed_tokens: int = 0  # local prefix hit, block aligned, when the plan was made
    traceparent: str | None = None  # of the decode worker's "kv pull" span: rides in the pull to the endpoint


@dataclass
class _SchedulerHold:
    block_ids: list[int]
    expires_at: float


class ConnectorScheduler:
    """The SCHEDULER role's half; vLLM calls it on its engine thread, between steps."""

    def __init__(self, layout: KVLayout, extra: dict, hold_mode: str) -> None:
        self.layout = layout
        self.worker_id = str(extra.get("worker_id", ""))
        self.lease_s = float(extra.get("lease_s", 30.0))
        self.hold_mode = hold_mode
        self.block_pool: "VllmBlockPool | None" = None
        self.address: str | None = None
        self.host_id, self.transports = "", ("tcp",)
        self._plans: dict[str, _LoadPlan] = {}
        self._attempted: set[str] = set()  # one load per request: a retry after failure computes locally
        self._loading: dict[str, int] = {}  # loads started and not yet reported finished -> tokens computed before
        self._held: dict[str, _SchedulerHold] = {}  # refcount mode: blocks we hold a reference on
        self._meta = PdserveConnectorMetadata()
        self.stats_path = str(extra["stats_path"]) if extra.get("stats_path") else None
        self._usage: PoolUsagePublisher | None = None
        num_tier_slots = tier_size(extra, layout)
        self.host_tier = HostTierPlanner(num_tier_slots, layout.block_size) if num_tier_slots else None
        self._tier_plans: dict[str, int] = {}  # request id -> vLLM's own hit (tokens) when a tier load was offered

    def bind_block_pool(self, block_pool: "VllmBlockPool") -> None:
        self.block_pool = block_pool
        if self.stats_path and self._usage is None:
            self._usage = PoolUsagePublisher(block_pool, pool_stats_path(self.stats_path),
                                             extra=self.host_tier.stats if self.host_tier is not None else None)
            self._usage.start()

    def shutdown(self) -> None:
        if self._usage is not None:
            self._usage.stop()
            self._usage = None

    def set_handshake(self, metadata: dict) -> None:
        handshakes = [m for m in metadata.values() if isinstance(m, PdserveHandshake)]
        addresses = {m.address for m in handshakes}
        if len(addresses) != 1:
            raise ValueError(f"pdserve expects one KV transfer endpoint per engine (one worker), got {sorted(addresses)}")
        self.address = addresses.pop()
        self.host_id, self.transports = handshakes[0].host_id, tuple(handshakes[0].transports)
        logger.info("kv connector: this engine serves KV from %s (%s, %s holds)", self.address, self.layout,
                    self.hold_mode)

    # ---- decode: loads

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """Offer the remote prompt KV as an async load, or else the host tier's blocks as a synchronous one.
        Side-effect free apart from remembering the plan (vLLM may ask again next step); the plan is acted on in
        update_state_after_alloc."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or request.request_id in self._attempted:
            return self._offer_tier(request, num_computed_tokens)
        try:
            remote = KVTransferParams.model_validate(params.get("pdserve"))
        except ValidationError as e:
            self._plans[request.request_id] = _LoadPlan(None, f"invalid kv_transfer_params['pdserve']: {e.errors()[:1]}")
            return 0, False
        if remote.kv_layout != self.layout:
            self._plans[request.request_id] = _LoadPlan(None, (
                f"KV layout mismatch: prefill {remote.worker_id} has {remote.kv_layout!r}, this engine has "
                f"{self.layout!r}; run every worker with the same model, dtype and block size"))
            return 0, False
        # The last prompt token is always computed here: its forward pass yields the next token's logits.
        num_loadable = min(remote.num_tokens, request.num_prompt_tokens - 1)
        num_needed_blocks = -(-num_loadable // self.layout.block_size)
        if num_needed_blocks > len(remote.block_ids):
            self._plans[request.request_id] = _LoadPlan(None, (
                f"prefill {remote.worker_id} offers {len(remote.block_ids)} blocks for {remote.num_tokens} tokens, "
                f"{num_needed_blocks} blocks of {self.layout.block_size} are needed"))
            return 0, False
        count = num_loadable - num_computed_tokens
        traceparent = params.get("traceparent")
        self._plans[request.request_id] = _LoadPlan(remote, None, num_computed_tokens,
                                                    traceparent if tracecontext.valid(traceparent) else None)
        return (count, True) if count > 0 else (0, False)

    def _offer_tier(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        if self.host_tier is None:
            return 0, False
        count = self.host_tier.num_loadable_tokens(request, num_computed_tokens)
        if count:
            self._tier_plans[request.request_id] = num_computed_tokens
        return count, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        num_tier_hit = self._tier_plans.pop(request.request_id, None)
        if num_tier_hit is not None and num_external_tokens:
            (block_ids,) = blocks.get_block_ids()
            self.host_tier.plan_load(request, block_ids, num_tier_hit, num_external_tokens)
            logger.debug("request %s: %d prompt tokens copied back from the host-memory tier", request.request_id,
                         num_external_tokens)
            return
        plan = self._plans.pop(request.request_id, None)
        if plan is None:
            return
        rid = request.request_id
        self._attempted.add(rid)
        if plan.error is not None:
            self._meta.skipped.append((rid, plan.error))
            return
        assert plan.params is not None
        if num_external_tokens == 0:
            self._meta.cached.append(rid)  # everything was found locally; nothing to pull, nothing recomputed
            return
        (block_ids,) = blocks.get_block_ids()
        bs = self.layout.block_size
        first = plan.num_computed_tokens // bs
        last = -(-(plan.num_computed_tokens + num_external_tokens) // bs)
        self._meta.loads.append(LoadSpec(rid, plan.params.model_dump(mode="json"),
                                         list(plan.params.block_ids[first:last]), list(block_ids[first:last]),
                                         plan.traceparent, num_external_tokens))
        self._loading[rid] = plan.num_computed_tokens

    # ---- prefill: holds

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self._plans.pop(rid, None)
        self._tier_plans.pop(rid, None)
        self._attempted.discard(rid)
        if self.host_tier is not None and block_ids:
            # Aborted while its KV was being pulled: vLLM counts the tokens as computed, but only those before the
            # pull's are in the blocks.
            self.host_tier.plan_save(request, block_ids, self._loading.get(rid, request.num_computed_tokens))
        if rid in self._loading:  # aborted while its KV was being pulled: stop the pull
            self._meta.cancelled.append(rid)
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or not block_ids:
            # EOS, abort, error: nobody will decode this request, hold nothing.
            return False, None
        if self.address is None:
            logger.error("request %s: no KV transfer endpoint registered; cannot hand its KV to decode", rid)
            return False, None
        num_tokens = request.num_computed_tokens
        held = list(block_ids[: -(-num_tokens // self.layout.block_size)])
        expires_at = time.time() + self.lease_s
        hold = HoldSpec(rid, uuid.uuid4().hex, secrets.token_urlsafe(16), held, expires_at)
        self._meta.holds.append(hold)
        kv_params = KVTransferParams(
            worker_id=self.worker_id, address=self.address, transfer_id=hold.transfer_id, token=hold.token,
            block_ids=tuple(held), num_tokens=num_tokens, kv_layout=self.layout, lease_expires_at=expires_at,
            host_id=self.host_id, transports=self.transports)
        out = {"pdserve": kv_params.model_dump(mode="json")}
        if self.hold_mode == "delay_free":
            return True, out
        assert self.block_pool is not None, "vLLM did not bind its block pool to the connector"
        blocks = [self.block_pool.blocks[b] for b in block_ids]
        self.block_pool.touch([b for b in blocks if not b.is_null])
        self._held[rid] = _SchedulerHold([b.block_id for b in blocks if not b.is_null], expires_at)
        return False, out

    def _free_held(self, rid: str) -> bool:
        hold = self._held.pop(rid, None)
        if hold is None:
            return False
        assert self.block_pool is not None
        self.block_pool.free_blocks(self.block_pool.blocks[b] for b in reversed(hold.block_ids))
        return True

    def has_pending_block_frees(self) -> bool:
        now = time.time()
        return any(now > h.expires_at for h in self._held.values())

    # ---- per step

    def build_connector_meta(self) -> PdserveConnectorMetadata:
        now = time.time()
        for rid in [r for r, h in self._held.items() if now > h.expires_at]:
            # Freed now, reusable from the next step on; the worker releases the transfer when it binds this
            # step's metadata, which is before any later step can write into the blocks.
            self._free_held(rid)
            self._meta.expired.append(rid)
        if self.host_tier is not None:
            self._meta.tier_saves, self._meta.tier_loads = self.host_tier.take_copies()
        meta, self._meta = self._meta, PdserveConnectorMetadata()
        return meta

    def reset_cache(self) -> bool:
        """vLLM's reset_prefix_cache(reset_connector=True): the host tier forgets its copies. Holds and pulls in flight
        are requests' own KV, not a cache: they stay."""
        if self.host_tier is not None:
            self.host_tier.reset()
        return True

    def take_events(self) -> list:
        """The host tier's KV events of this step, published by vLLM with its own."""
        return self.host_tier.take_events() if self.host_tier is not None else []

    def update_connector_output(self, connector_output: Any) -> None:
        for rid in connector_output.finished_recving or ():
            self._loading.pop(rid, None)
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, PdserveWorkerMetadata):
            for rid in worker_meta.released:
                self._free_held(rid)

