"""What the two halves of pdserve's vLLM KV connector say to each other, through vLLM's channels.

The scheduler half (EngineCore process) and the worker half (the process that owns the KV tensors) share no
memory: these dataclasses are all they exchange (vLLM carries them between the processes). Kept apart from
both halves so that each imports the messages and neither imports the other.
  scheduler -> worker  PdserveConnectorMetadata, once per engine step
  worker -> scheduler  PdserveWorkerMetadata (holds released) with each step's KVConnectorOutput, and
                       PdserveHandshake once at start-up
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


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
    num_tokens: int = 0  # the prompt tokens this load brings (vLLM computes them itself if it fails)


@dataclass
class PdserveConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per engine step."""

    holds: list[HoldSpec] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # holds the scheduler freed at lease end
    loads: list[LoadSpec] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (request_id, why) loads refused before a pull
    cancelled: list[str] = field(default_factory=list)  # loads of requests aborted while waiting for KV
    cached: list[str] = field(default_factory=list)  # loads not needed: the engine's prefix cache had it all
    tier_saves: list[tuple[int, int]] = field(default_factory=list)  # (block id, host tier slot), made first
    tier_loads: list[tuple[int, int]] = field(default_factory=list)  # (host tier slot, block id)


@dataclass
class PdserveWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: holds released (decode done) or expired, whose blocks the scheduler may free."""

    released: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PdserveWorkerMetadata)
        return PdserveWorkerMetadata(self.released | other.released)

