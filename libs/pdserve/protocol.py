"""Every message pdserve sends between processes.

Each message is a frozen pydantic model with a `type` tag and a `schema_version`; on the wire it is orjson.
Messages arrive from other processes, possibly of another version, so everything is validated on receipt:
`decode()` raises `InvalidMessage` for malformed JSON, a wrong type tag, an unknown schema version or a
field of the wrong shape, and the bus logs and drops such a message instead of crashing the service.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

MAX_RDMA_PORTS = 32  # a heartbeat's; hosts have up to 8 or so NICs of 1-2 ports
Role = Literal["prefill", "decode", "broker"]
FinishReason = Literal["stop", "length", "abort", "error"]


class InvalidMessage(ValueError):
    """A message that does not parse or validate as the expected type."""


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    type: str
    schema_version: int = SCHEMA_VERSION


M = TypeVar("M", bound=Message)


def encode(msg: Message) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def decode(data: bytes, cls: type[M]) -> M:
    """Parse and validate `data` as a `cls`; raises InvalidMessage naming what is wrong."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidMessage(f"not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(raw).__name__}")
    expected_type = cls.model_fields["type"].default
    if raw.get("type") != expected_type:
        raise InvalidMessage(f"expected message type {expected_type!r}, got {raw.get('type')!r}")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise InvalidMessage(
            f"{expected_type}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}; "
            "run the same pdserve version on every service"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise InvalidMessage(f"{expected_type}: {e.error_count()} invalid field(s): {e.errors()[0]}") from e


# ---------------------------------------------------------------------------------------------- models


class KVLayout(BaseModel):
    """Shape of the KV cache; both ends of a transfer must agree on it byte for byte."""

    model_config = ConfigDict(frozen=True)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype: str
    dtype_bytes: int = Field(gt=0)
    block_size: int = Field(gt=0, description="tokens per KV block")

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class ModelCard(BaseModel):
    """What the router needs to serve a model: name, tokenizer, limits, KV layout."""

    model_config = ConfigDict(frozen=True)
    name: str
    tokenizer: str = Field(description="'byte' for the mock engine, else a local Hugging Face directory")
    max_model_len: int = Field(gt=0)
    kv_layout: KVLayout


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True)
    max_tokens: int = Field(gt=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


# ------------------------------------------------------------------------------------ membership


# A heartbeat interval outside these bounds is refused: a member that claims to beat once in 1e9 s would be
# listed for ever after it died, and one that beats 1000 times a second is a flood, not a worker.
MIN_HEARTBEAT_INTERVAL_S = 0.05
MAX_HEARTBEAT_INTERVAL_S = 60.0


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"
    worker_id: str = Field(min_length=1, max_length=200)
    role: Role
    model: ModelCard | None = None
    transfer_address: str | None = Field(default=None, max_length=300)
    metrics_address: str | None = Field(default=None, max_length=300,
                                        description="Prometheus endpoint, http://host:port/metrics")
    num_queued: int = Field(default=0, ge=0)
    num_running: int = Field(default=0, ge=0)
    kv_usage: float = Field(default=0.0, ge=0.0, le=1.0)
    num_held_blocks: int = Field(default=0, ge=0)
    num_requests_served: int = Field(default=0, ge=0)
    kv_event_seq: int = Field(default=0, ge=0, description="seq of the last KVEvent this worker published (the "
                              "broker asks for a snapshot when it stays behind it)")
    kv_transports: tuple[str, ...] = Field(default=(), max_length=8, description="paths its endpoint offers")
    reuses_peer_prefixes: bool = Field(default=False, description="its engine leases cached prefixes to peers and "
                                       "loads theirs (PrefixLeaseRequest, PrefillRequest.prefix_kv)")
    num_kv_pulls: dict[str, int] = Field(default_factory=dict, max_length=8,
                                         description="KV pulls this worker made, by the path the bytes took")
    num_reconnects: int = Field(default=0, ge=0, description="times this worker's NATS connection was made again: "
                                "what it published or was sent just before may be lost (routers stop waiting on it)")
    unreachable_peer_ids: tuple[str, ...] = Field(default=(), max_length=1024, description=(
        "prefill workers whose transfer endpoints this worker could not connect to (peer_paths.py): routers do not "
        "pair it with them until a probe clears the mark"))
    rdma_ports: tuple[Annotated[str, Field(max_length=100)], ...] = Field(
        default=(), max_length=MAX_RDMA_PORTS, description=(
            "its host's RDMA ports when it started, 'mlx5_0/1 ACTIVE RoCE' each (rdma_devices.py); empty: no RDMA "
            "device, so KV moves between it and other hosts over TCP"))
    interval_s: float = Field(ge=MIN_HEARTBEAT_INTERVAL_S, le=MAX_HEARTBEAT_INTERVAL_S)
    sent_at: float
    started_at: float


class Goodbye(Message):
    type: Literal["goodbye"] = "goodbye"
    worker_id: str
    role: Role


class StatsRequest(Message):
    type: Literal["stats_request"] = "stats_request"


class WorkerStats(Message):
    """A worker's counters; the test-visible face of its engine and transport.

    The leak accounting surface: after every request ended, num_held_blocks returns to 0 and kv_usage to
    its idle level. num_held_blocks counts the KV blocks pdserve holds: the mock engine's allocated blocks
    (running requests and transfers), or on vLLM the blocks its connector keeps for KV transfers (vLLM owns
    its running requests' blocks; kv_usage and num_free_blocks are its block pool's, so they include them).
    """

    type: Literal["worker_stats"] = "worker_stats"
    worker_id: str
    role: Role
    num_requests_served: int = 0
    num_queued: int = 0
    num_running: int = 0
    num_held_blocks: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_usage: float = 0.0
    num_kv_blocks_sent: int = 0
    num_kv_bytes_sent: int = 0
    num_kv_blocks_received: int = 0
    num_kv_bytes_received: int = 0
    kv_transfer_ms: float = 0.0
    num_kv_pulls_tcp: int = 0
    num_kv_pulls_shm: int = 0
    num_kv_transport_fallbacks: int = 0
    num_transfers_refused: int = 0
    num_recomputes: int = 0
    num_local_prefills: int = 0
    num_prefix_peer_loaded_tokens: int = 0
    num_prefix_peer_loaded_bytes: int = 0
    num_prefix_peer_load_failures: int = 0
    num_prefix_host_loaded_tokens: int = 0
    num_computed_prompt_tokens: int = 0
    num_host_tier_blocks: int = 0


# ---------------------------------------------------------------------------------- request flow


class KVTransferParams(BaseModel):
    """Where a request's KV blocks are and how to read them (prefill -> router -> decode)."""

    model_config = ConfigDict(frozen=True)
    worker_id: str
    address: str = Field(description="transfer endpoint, tcp://host:port")
    transfer_id: str
    token: str
    block_ids: tuple[int, ...]
    num_tokens: int = Field(ge=0, description="prompt tokens whose KV the blocks hold")
    kv_layout: KVLayout
    lease_expires_at: float
    host_id: str = Field(default="", description="the prefill endpoint's host identity (kv/host.py): a puller with "
                         "the same one may take a same-host path")
    transports: tuple[str, ...] = Field(default=("tcp",), description="paths the endpoint offers: tcp, shm")


class PrefillRequest(Message):
    type: Literal["prefill_request"] = "prefill_request"
    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline: float = Field(description="unix time by which the KV-ready answer is useless")
    prefix_kv: KVTransferParams | None = Field(
        default=None, description="a peer holds the prompt's leading blocks (block_ids) for this worker to pull "
        "instead of computing them; the worker releases them on that peer once pulled or given up")


class PrefixLeaseRequest(Message):
    """Router -> a worker whose cache holds a prompt's leading blocks: hold them for another worker to pull."""

    type: Literal["prefix_lease_request"] = "prefix_lease_request"
    request_id: str
    model: str
    block_hashes: tuple[int, ...] = Field(description="the prompt's leading full blocks, chained hashes")
    prefix_token_ids: tuple[int, ...] = Field(default=(), description=(
        "those blocks' tokens: an engine that finds cached blocks by running their tokens (vLLM) needs them"))
    deadline: float = Field(description="unix time after which the router no longer waits: nothing is held then "
                            "(a lease nobody uses would pin its blocks until it ends)")


class PrefixLease(Message):
    """The reply: the leading blocks held (kv_transfer_params, None when none is cached here any more)."""

    type: Literal["prefix_lease"] = "prefix_lease"
    request_id: str
    worker_id: str
    kv_transfer_params: KVTransferParams | None = None


class KVReady(Message):
    """Prefill done: the first token and where its KV waits, with the transfer token (the reply to the router's
    prefill request only: it grants reading the request's KV)."""

    type: Literal["kv_ready"] = "kv_ready"
    request_id: str
    worker_id: str
    first_token_id: int
    first_text: str
    finish_reason: FinishReason | None = None
    kv_transfer_params: KVTransferParams | None = None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_peer_loaded_tokens: int = Field(default=0, ge=0, description="prompt tokens whose KV was pulled from a "
                                        "peer's cache (PrefillRequest.prefix_kv) instead of computed")
    num_peer_loaded_bytes: int = Field(default=0, ge=0, description="the bytes of that pull")
    peer_load_ms: float = Field(default=0.0, ge=0, description="the time that pull took")
    queue_ms: float = 0.0
    prefill_ms: float = 0.0


class KVHeld(Message):
    """A prefill worker holds a request's KV for a decode worker (for the broker and observers: no token)."""

    type: Literal["kv_held"] = "kv_held"
    request_id: str
    worker_id: str
    num_blocks: int = Field(ge=0)
    num_prompt_tokens: int = Field(ge=0)
    num_cached_tokens: int = Field(default=0, ge=0)
    lease_expires_at: float | None = None


class DecodeRequest(Message):
    type: Literal["decode_request"] = "decode_request"
    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    first_token_id: int | None = Field(
        default=None, description="token chosen by prefill; None: decode prefills locally"
    )
    kv_transfer_params: KVTransferParams | None = None
    prefix_kv: KVTransferParams | None = Field(default=None, description=(
        "decode prefills locally (first_token_id None): a peer's lease of the prompt's leading blocks to pull "
        "instead of computing them (services/router/prefix_reuse.py); released on that peer once pulled"))
    stream_subject: str
    stream_token: str = Field(min_length=16, description="secret of this attempt: the router accepts chunks only "
                              "with it, so nobody but the chosen decode worker can write into the stream")
    deadline: float
    resume_token_ids: tuple[int, ...] = Field(
        default=(), description="tokens an earlier decode worker streamed before it failed: prefill prompt + "
        "them locally and continue after them (first_token_id and kv_transfer_params are then None)"
    )
    attempt: int = Field(default=0, ge=0, description="the router's decode attempt of this request, counting up: "
                         "a later attempt on the same worker (a resume after chunks were lost) replaces the earlier "
                         "one, and a cancel of the earlier one does not stop it")


class DecodeAccepted(Message):
    type: Literal["decode_accepted"] = "decode_accepted"
    request_id: str
    worker_id: str


class TokenChunk(Message):
    """Decode -> router. `seq` counts from 0 per request; the last chunk has a finish_reason."""

    type: Literal["token_chunk"] = "token_chunk"
    request_id: str
    worker_id: str = Field(default="", description="the decode worker that sent it (one stream per attempt)")
    stream_token: str = Field(default="", description="DecodeRequest.stream_token of the attempt")
    seq: int = Field(ge=0)
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    error_code: str | None = Field(default=None, description="kv_full: the engine had no room for the request (an "
                                   "overload, not a fault: the router answers 429 with Retry-After when every "
                                   "decode worker says so)")


class KVRelease(Message):
    type: Literal["kv_release"] = "kv_release"
    request_id: str
    transfer_id: str
    ok: bool


class KVTransferDone(Message):
    type: Literal["kv_transfer_done"] = "kv_transfer_done"
    request_id: str
    prefill_worker_id: str
    decode_worker_id: str
    ok: bool
    num_blocks: int = 0
    num_bytes: int = 0
    transfer_ms: float = 0.0
    error: str | None = None


class CancelRequest(Message):
    """Abort a request and free what it holds; only on `worker_id` when given (retries elsewhere go on)."""

    type: Literal["cancel"] = "cancel"
    request_id: str
    worker_id: str | None = None
    attempt: int | None = Field(default=None, ge=0, description="only decode attempts up to this one (a later "
                                "attempt of the request on the same worker goes on); None: every attempt")


class ErrorReply(Message):
    """Reply to a request that could not be served; `retryable` tells the caller to try elsewhere."""

    type: Literal["error"] = "error"
    code: str
    message: str
    retryable: bool = True


# ---------------------------------------------------------------------------------------- broker


class KVEvent(Message):
    """Blocks a worker stored or removed, by chained block hash (pdserve.kv.hashing), whatever its engine.

    `stored` is one chain: each hash is the parent of the next, and `parent_hash` is the parent of the first
    (0, kv.hashing.ROOT_HASH, when the chain starts at a prompt's first block). A worker reports a block once
    while it holds it (it counts its engine's copies itself), so storing a held block again or removing an
    unheld one changes nothing.

    `seq` numbers a worker's events 1, 2, 3, ... (0: not numbered, never checked). `cleared`: forget
    everything this worker reported before; a snapshot is a cleared event followed by the events that
    re-store what the worker holds. The broker asks for a snapshot (KVResync) when it sees a gap in seq.
    """

    type: Literal["kv_event"] = "kv_event"
    worker_id: str
    model: str
    stored: tuple[int, ...] = ()
    parent_hash: int = 0
    removed: tuple[int, ...] = ()
    cleared: bool = False
    to_host: tuple[int, ...] = Field(default=(), description="held blocks now only in the worker's host-memory tier "
                                     "(its engine evicted them): still held, loaded back by a memory copy")
    to_device: tuple[int, ...] = Field(default=(), description="blocks of the host tier the engine holds again")
    seq: int = Field(default=0, ge=0)


class KVResync(Message):
    """Broker -> workers: send a snapshot of your stored blocks (a started broker asks everyone; a broker that
    missed events asks one worker)."""

    type: Literal["kv_resync"] = "kv_resync"
    broker_id: str
    worker_id: str | None = Field(default=None, description="only this worker; None: every worker")


class KVLookup(Message):
    """Which workers hold how many leading blocks of a prompt (its chained block hashes, block 0 first)."""

    type: Literal["kv_lookup"] = "kv_lookup"
    model: str
    block_hashes: tuple[int, ...]


class KVLookupReply(Message):
    type: Literal["kv_lookup_reply"] = "kv_lookup_reply"
    num_matched_blocks: dict[str, int] = Field(description="worker_id -> leading blocks it holds (0s left out)")
    num_matched_host_blocks: dict[str, int] = Field(default_factory=dict, description=(
        "worker_id -> how many of those blocks only its host-memory tier holds (0s left out)"))
    broker_id: str = ""
