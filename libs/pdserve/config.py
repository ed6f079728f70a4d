"""One frozen config per service, built in one place from CLI flags, `PDSERVE_*` variables and defaults.

Precedence: flag > environment (`PDSERVE_<FIELD>`, e.g. PDSERVE_NATS, PDSERVE_PREFILL_TIMEOUT_S) > default.
Every value is validated at start; a `ConfigError` says which flag or variable to change and how. How fields
become flags and variables: config_fields.py.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Literal

from pdserve import nats_auth
from pdserve.config_fields import ConfigError, add_arguments, build
from pdserve.config_fields import fail as _fail
from pdserve.config_fields import opt as _opt

__all__ = ["ConfigError", "add_arguments", "build", "BusOptions", "MockEngineOptions", "WorkerConfig", "RouterConfig",
           "BrokerConfig", "UpConfig", "read_api_keys", "DEFAULT_NATS", "MOCK_MODEL", "DEFAULT_VLLM_MODEL"]

DEFAULT_NATS = "nats://127.0.0.1:4222"
MOCK_MODEL = "pdserve-mock"
DEFAULT_VLLM_MODEL = "SmolLM2-135M-Instruct"
MOCK_NUM_KV_BLOCKS = 2048


@dataclass(frozen=True)
class BusOptions:
    nats: str = _opt(DEFAULT_NATS, "NATS server URL(s), comma-separated")
    nats_user: str | None = _opt(None, "NATS user name")
    nats_password: str | None = _opt(None, "NATS password (prefer the env variable: flags show in `ps`)", secret=True)
    nats_token: str | None = _opt(None, "NATS auth token (prefer the env variable: flags show in `ps`)", secret=True)
    nats_credentials_file: str | None = _opt(None, "file with this service's NATS identity (PDSERVE_NATS_USER= and "
                                             "PDSERVE_NATS_PASSWORD= lines), as `pdserve nats-config` and `pdserve up` "
                                             "write them")
    nats_tls_ca: str | None = _opt(None, "CA certificate (PEM) that signed the NATS server's certificate; turns TLS on")
    nats_tls_cert: str | None = _opt(None, "client certificate (PEM) for NATS servers that verify clients; with --nats-tls-key")
    nats_tls_key: str | None = _opt(None, "private key (PEM) of --nats-tls-cert")
    connect_timeout_s: float = _opt(15.0, "how long to wait for NATS at start-up")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        if self.nats_credentials_file:
            if self.nats_user or self.nats_password or self.nats_token:
                _fail("nats_credentials_file", "given together with --nats-user/--nats-password/--nats-token",
                      "give the identity one way only")
            try:
                user, password = nats_auth.read_credentials_file(self.nats_credentials_file)
            except nats_auth.CredentialsFileError as e:
                _fail("nats_credentials_file", str(e), "give a file written by `pdserve nats-config` (or pdserve up)")
            object.__setattr__(self, "nats_user", user)
            object.__setattr__(self, "nats_password", password)
        for url in self.nats_servers:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                _fail("nats", f"{url!r} is not a NATS URL", "use nats://HOST:PORT (the default is " + DEFAULT_NATS + ")")
        if self.nats_password and not self.nats_user:
            _fail("nats_password", "a password without a user name", "also give --nats-user / PDSERVE_NATS_USER")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            _fail("nats_tls_cert", "a client certificate and its key go together",
                  "give both --nats-tls-cert and --nats-tls-key (or neither)")
        for name in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                _fail(name, f"{path!r} is not a readable file", "give the path of a PEM file")
        if self.connect_timeout_s <= 0:
            _fail("connect_timeout_s", "must be > 0", "give a number of seconds such as 15")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            _fail("log_level", f"unknown level {self.log_level!r}", "use DEBUG, INFO, WARNING or ERROR")

    @property
    def nats_servers(self) -> list[str]:
        return [s.strip() for s in self.nats.split(",") if s.strip()]

    @property
    def nats_tls(self) -> bool:
        return bool(self.nats_tls_ca or self.nats_tls_cert) or any(u.startswith(("tls://", "wss://")) for u in self.nats_servers)


@dataclass(frozen=True)
class MockEngineOptions:
    """The mock engine's timing model and KV shape (defaults: SmolLM2-135M's KV, fp16)."""

    mock_ms_per_prompt_token: float = _opt(0.02, "simulated prefill time per prompt token")
    mock_ms_per_decode_step: float = _opt(2.0, "simulated time per generated token")
    mock_num_layers: int = _opt(30, "layers of the simulated KV")
    mock_num_kv_heads: int = _opt(3, "KV heads of the simulated KV")
    mock_head_dim: int = _opt(64, "head dimension of the simulated KV")
    mock_dtype_bytes: int = _opt(2, "bytes per KV element (2: fp16/bf16)")


@dataclass(frozen=True)
class WorkerConfig(BusOptions, MockEngineOptions):
    role: Literal["prefill", "decode"] = _opt("prefill", "prefill or decode")
    worker_id: str = _opt("", "unique worker id (default: role-host-pid-random)")
    engine: Literal["mock", "vllm"] = _opt("mock", "inference engine: vllm, or mock (deterministic, for tests)")
    model: str = _opt("", f"vllm: a local Hugging Face directory or {DEFAULT_VLLM_MODEL} (pulled once); "
                          f"mock: the name to serve [default: {DEFAULT_VLLM_MODEL} / {MOCK_MODEL}]")
    served_model_name: str = _opt("", "name clients use in requests (default: the model's directory name)")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", "vllm: weights and KV dtype")
    kv_cache_gib: int = _opt(1, "vllm on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    cpu_cores: str | None = _opt(None, "vllm on CPU: cores for this engine, e.g. 0 or 2-3 (pdserve up assigns them)")
    max_model_len: int = _opt(4096, "context limit in tokens")
    block_size: int = _opt(32, "tokens per KV block (must match on every worker; vLLM on CPU takes multiples of 32)")
    enforce_eager: bool = _opt(True, "vllm: skip torch.compile (start in ~30 s instead of minutes on a CPU)")
    num_kv_blocks: int = _opt(0, f"KV blocks the engine owns (0: mock {MOCK_NUM_KV_BLOCKS}; vllm as many as "
                                 "--kv-cache-gib holds)")
    prefix_caching: bool = _opt(True, "keep finished prompts' KV blocks as an evictable prefix cache, reuse them for "
                                "prompts that start the same, and report them to the KV broker (vllm: its "
                                "enable_prefix_caching, with its KV events relayed); --no-prefix-caching turns it off")
    kv_host_cache_gib: float = _opt(0.0, "GiB of host memory that keep the KV blocks the engine's prefix cache evicts "
                                    "(least recently used dropped first), loaded back or served to peers instead of "
                                    "recomputed; 0: none")
    advertise_host: str | None = _opt(None, "host other machines reach this worker at (default: the interface that reaches NATS)")
    bind_host: str | None = _opt(None, "interface the transfer endpoint binds (default: the advertised host)")
    heartbeat_interval_s: float = _opt(1.0, "seconds between heartbeats; 3 missed = gone")
    max_queue: int = _opt(256, "requests waiting or running before new ones are refused")
    kv_lease_s: float = _opt(30.0, "how long prefill keeps a request's KV for the decode worker")
    kv_pull_timeout_s: float = _opt(10.0, "deadline for pulling one request's KV before recomputing locally")
    kv_connect_timeout_s: float = _opt(2.0, "deadline for a new connection to a prefill worker's transfer endpoint "
                                       "(shorter than the pull's: a path that cannot connect is marked unreachable "
                                       "and later requests avoid it)")
    kv_probe_interval_s: float = _opt(2.0, "decode: how often a prefill worker marked unreachable is probed (a TCP "
                                      "connect to its endpoint); the mark clears when a probe connects")
    kv_transport: Literal["auto", "tcp", "shm", "cuda-ipc", "nixl"] = _opt(
        "auto", "how pulled KV travels: auto (from a prefill worker on this host: cuda-ipc between GPUs, shm "
        "otherwise; across hosts nixl where this host has an active RDMA port and the bus has credentials, else "
        "tcp), tcp, shm, cuda-ipc or nixl (NIXL over UCX; these three fall back to tcp with a WARNING where they "
        "cannot work; nixl on a NATS without credentials is offered with a WARNING)")

    def __post_init__(self) -> None:
        BusOptions.__post_init__(self)
        if not self.model:
            object.__setattr__(self, "model", DEFAULT_VLLM_MODEL if self.engine == "vllm" else MOCK_MODEL)
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", os.path.basename(os.path.normpath(self.model)))
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}")
        if not all(c.isalnum() or c in "-_" for c in self.worker_id):
            _fail("worker_id", f"{self.worker_id!r} has characters NATS subjects cannot carry", "use letters, digits, - and _")
        for name in ("max_model_len", "block_size", "max_queue"):
            if getattr(self, name) <= 0:
                _fail(name, "must be > 0", "give a positive whole number")
        if self.num_kv_blocks < 0:
            _fail("num_kv_blocks", "must be >= 0", "give a whole number of blocks, or 0 for the engine's default")
        for name in ("heartbeat_interval_s", "kv_lease_s", "kv_pull_timeout_s", "kv_connect_timeout_s",
                     "kv_probe_interval_s"):
            if getattr(self, name) <= 0:
                _fail(name, "must be > 0", "give a positive number of seconds")
        if self.kv_host_cache_gib < 0:
            _fail("kv_host_cache_gib", "must be >= 0", "give a size in GiB, or 0 for no host tier")
        if self.kv_host_cache_gib > 0 and not self.prefix_caching:
            _fail("kv_host_cache_gib", "the host-memory KV tier keeps what the prefix cache evicts",
                  "turn prefix caching on, or leave it 0")
        num_kv_blocks = self.num_kv_blocks or (MOCK_NUM_KV_BLOCKS if self.engine == "mock" else 0)
        if num_kv_blocks and self.max_model_len > num_kv_blocks * self.block_size:
            _fail("num_kv_blocks", f"{num_kv_blocks} blocks of {self.block_size} tokens cannot hold one "
                  f"{self.max_model_len}-token request", f"raise it to at least {-(-self.max_model_len // self.block_size)}")


@dataclass(frozen=True)
class RouterConfig(BusOptions):
    host: str = _opt("127.0.0.1", "HTTP bind address")
    port: int = _opt(8000, "HTTP port")
    router_id: str = _opt("", "unique router id (default: router-host-pid-random)")
    prefill_timeout_s: float = _opt(60.0, "deadline for a prefill worker's KV-ready answer")
    decode_accept_timeout_s: float = _opt(5.0, "deadline for a decode worker to accept a request")
    stream_idle_timeout_s: float = _opt(30.0, "longest gap between two token chunks before the decode is given up")
    request_timeout_s: float = _opt(600.0, "deadline for a whole request")
    max_attempts: int = _opt(3, "workers tried per role before giving up on a request")
    kv_lookup_timeout_s: float = _opt(0.2, "deadline for the KV broker's lookup answer (none in time: load-only routing)")
    routing: Literal["kv", "least_load", "round_robin"] = _opt(
        "kv", "kv: lowest cost = blocks to recompute weighed against load (README: KV-aware routing); least_load: "
        "queued + running alone; round_robin: in turn (for comparisons)")
    route_w_recompute: float = _opt(1.0, "routing cost per prompt block the worker does not hold")
    route_w_queue: float = _opt(8.0, "routing cost per request queued on the worker")
    route_w_running: float = _opt(4.0, "routing cost per request running on the worker")
    route_w_kv: float = _opt(16.0, "routing cost of a full KV cache (x kv_usage, 0..1)")
    kv_prefix_reuse: bool = _opt(True, "a prefill worker that lacks leading blocks of the prompt that another "
                                 "worker's cache holds pulls them from it instead of computing them, where pulling "
                                 "is estimated to be faster (mock and vLLM engines)")
    prefix_lease_timeout_s: float = _opt(0.5, "deadline for a worker to hold a cached prefix for a peer (none in "
                                         "time: the prefix is computed)")
    kv_pull_gbps_estimate: float = _opt(1.0, "KV pull bandwidth (GB/s) the prefix-reuse cost model assumes until "
                                        "it has measured prefix pulls")
    local_prefill_max_tokens: int = _opt(0, "the decode worker prefills itself when fewer prompt tokens than this are "
                                         "left after its own prefix-cache hit (0: off)")
    prefill_queue_limit: int = _opt(0, "the decode worker prefills itself when every prefill worker has this many "
                                    "requests queued or running (0: off)")
    max_inflight: int = _opt(512, "requests the router serves at once; more get 429 with Retry-After at once")
    early_refusal: bool = _opt(True, "answer 429 at once when the request's deadline cannot be met: every prefill "
                               "worker's load (queued + running) times the mean prefill time the router observed "
                               "already exceeds --request-timeout-s")
    max_body_bytes: int = _opt(4 * 1024 * 1024, "largest request body; a larger one gets 413 before parsing")
    header_timeout_s: float = _opt(10.0, "a connection must finish a request's headers this long after their first "
                                   "byte (and send that byte this long after connecting), else it is closed")
    max_header_bytes: int = _opt(64 * 1024, "largest request head (request line and headers); a larger one gets 431")
    api_keys_file: str | None = _opt(None, "file of API keys clients must send as `Authorization: Bearer KEY` "
                                     "(one per line, # comments); with PDSERVE_API_KEYS, keys of both count")
    api_keys: str | None = _opt(None, "API keys, comma-separated (environment only, never a flag)", secret=True,
                                env_only=True)

    def __post_init__(self) -> None:
        BusOptions.__post_init__(self)
        if not self.router_id:
            object.__setattr__(self, "router_id", f"router-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}")
        if not 0 <= self.port <= 65535:
            _fail("port", f"{self.port} is not a TCP port", "use 1-65535 (0 picks a free one)")
        for name in ("prefill_timeout_s", "decode_accept_timeout_s", "stream_idle_timeout_s", "request_timeout_s",
                     "kv_lookup_timeout_s", "header_timeout_s", "prefix_lease_timeout_s", "kv_pull_gbps_estimate"):
            if getattr(self, name) <= 0:
                _fail(name, "must be > 0", "give a positive number of seconds")
        if self.max_attempts < 1:
            _fail("max_attempts", "must be >= 1", "give a positive whole number")
        for name in ("route_w_recompute", "route_w_queue", "route_w_running", "route_w_kv",
                     "local_prefill_max_tokens", "prefill_queue_limit"):
            if getattr(self, name) < 0:
                _fail(name, "must be >= 0", "give 0 or a positive number")
        for name in ("max_inflight", "max_body_bytes", "max_header_bytes"):
            if getattr(self, name) <= 0:
                _fail(name, "must be > 0", "give a positive whole number")
        if self.api_keys_file:
            try:
                if not read_api_keys(self.api_keys_file):
                    _fail("api_keys_file", f"{self.api_keys_file!r} holds no key (only blank or # lines)",
                          "put one API key per line")
            except OSError as e:
                _fail("api_keys_file", f"cannot read {self.api_keys_file!r} ({e.strerror})",
                      "give a readable file with one API key per line")
        if self.api_keys is not None and not _split_keys(self.api_keys):
            _fail("api_keys", "set but empty", "give comma-separated keys, or unset PDSERVE_API_KEYS")

    @property
    def api_key_set(self) -> frozenset[str]:
        """Every key a client may send (file and environment); empty: the API is open."""
        keys = _split_keys(self.api_keys or "")
        if self.api_keys_file:
            keys |= read_api_keys(self.api_keys_file)
        return frozenset(keys)


def read_api_keys(path: str) -> set[str]:
    """One key per line; blank lines and lines starting with # are skipped, so is a trailing ` # note`."""
    keys = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                keys.add(line.split()[0])
    return keys


def _split_keys(value: str) -> set[str]:
    return {k.strip() for k in value.split(",") if k.strip()}


@dataclass(frozen=True)
class BrokerConfig(BusOptions):
    broker_id: str = _opt("", "unique broker id (default: broker-host-pid-random)")
    heartbeat_interval_s: float = _opt(1.0, "seconds between heartbeats")

    def __post_init__(self) -> None:
        BusOptions.__post_init__(self)
        if not self.broker_id:
            object.__setattr__(self, "broker_id", f"broker-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}")


_SECURITY = "security (see README: Security and overload)"
# pdserve up's cluster is on one machine, for failover: 3 nodes survive any one dying; more only cost memory
# and routes (every node routes to every other).
MAX_NATS_CLUSTER = 7


@dataclass(frozen=True)
class UpConfig:
    """`pdserve up`: the whole system on one machine (launcher.py). Not BusOptions: without --nats it starts its
    own NATS, and the identities it is given are for the services it starts, each by its environment."""

    nats: str | None = _opt(None, "use this NATS server (or cluster: its URLs comma-separated) instead of starting "
                            "one", shown_default="start one")
    nats_cluster: int = _opt(1, "without --nats: start this many nats-servers on 127.0.0.1 as one cluster, and give "
                             "every service all their URLs (a service whose node dies carries on through another; "
                             "a node that dies is restarted)")
    host: str = _opt("127.0.0.1", "router HTTP bind address")
    port: int = _opt(8000, "router HTTP port")
    prefill: int = _opt(1, "prefill workers")
    decode: int = _opt(1, "decode workers")
    engine: Literal["mock", "vllm"] = _opt("mock", "inference engine: vllm, or mock (deterministic, for tests)")
    model: str = _opt("", "vllm: a local Hugging Face directory (the default is pulled once); mock: the name to serve",
                      shown_default=f"{DEFAULT_VLLM_MODEL} / {MOCK_MODEL}")
    advertise_host: str | None = _opt(None, "address workers advertise", shown_default="detected")
    kv_transport: Literal["auto", "tcp", "shm", "cuda-ipc", "nixl"] = _opt(
        "auto", "how pulled KV travels between workers: auto (shm on one host, tcp across hosts), tcp, shm, cuda-ipc "
        "or nixl (NIXL over UCX)")
    prefix_caching: bool = _opt(True, "workers keep finished prompts' KV as a prefix cache that KV-aware routing "
                                "follows; --no-prefix-caching turns it off")
    kv_host_cache_gib: float = _opt(0.0, "each worker keeps what its prefix cache evicts in this many GiB of host "
                                    "memory (0: none)")
    startup_timeout_s: float | None = _opt(None, "how long to wait for every service to come up",
                                           shown_default="60 mock, 600 vllm")
    log_level: str = _opt("INFO", "log level of every service: DEBUG, INFO, WARNING or ERROR")
    run_dir: str | None = _opt(None, "where its NATS keeps its configuration, log and the roles' NATS identities (the "
                               "observer's is for `pdserve status` and `nats sub`)",
                               shown_default="a new private temporary directory, removed at exit")
    api_keys_file: str | None = _opt(None, "router: clients must send `Authorization: Bearer KEY` with a key of this "
                                     "file (one per line, # comments); PDSERVE_API_KEYS=k1,k2 also works", group=_SECURITY)
    nats_credentials_dir: str | None = _opt(None, "with --nats: the directory `pdserve nats-config` wrote; each "
                                            "service gets its role's identity from it", group=_SECURITY)
    nats_user: str | None = _opt(None, "with --nats: one NATS user name for every service (no per-role permissions; "
                                 "prefer --nats-credentials-dir)", group=_SECURITY)
    nats_password: str | None = _opt(None, "with --nats: one NATS password for every service (no per-role "
                                     "permissions; prefer --nats-credentials-dir)", secret=True, group=_SECURITY)
    nats_token: str | None = _opt(None, "with --nats: one NATS auth token for every service (no per-role permissions; "
                                  "prefer --nats-credentials-dir)", secret=True, group=_SECURITY)
    nats_tls_ca: str | None = _opt(None, "TLS to an external --nats: CA certificate of the NATS server (PEM)",
                                   group=_SECURITY)
    nats_tls_cert: str | None = _opt(None, "TLS to an external --nats: client certificate (PEM)", group=_SECURITY)
    nats_tls_key: str | None = _opt(None, "TLS to an external --nats: client certificate's key (PEM)", group=_SECURITY)

    def __post_init__(self) -> None:
        if self.startup_timeout_s is None:
            object.__setattr__(self, "startup_timeout_s", 600.0 if self.engine == "vllm" else 60.0)
        if self.startup_timeout_s <= 0:
            _fail("startup_timeout_s", "must be > 0", "give a positive number of seconds")
        if not 1 <= self.port <= 65535:
            _fail("port", f"{self.port} is not a TCP port", "use 1-65535")
        for name in ("prefill", "decode"):
            if getattr(self, name) < 1:
                _fail(name, "must be at least 1", "give a positive whole number of workers")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            _fail("log_level", f"unknown level {self.log_level!r}", "use DEBUG, INFO, WARNING or ERROR")
        for url in (self.nats or "").split(","):
            if url.strip() and not url.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                _fail("nats", f"{url.strip()!r} is not a NATS URL", "use nats://HOST:PORT, or leave it out: pdserve up "
                      "then starts its own")
        if not 1 <= self.nats_cluster <= MAX_NATS_CLUSTER:
            _fail("nats_cluster", f"{self.nats_cluster} nodes is not 1 to {MAX_NATS_CLUSTER}",
                  f"give 1 (one nats-server, the default) to {MAX_NATS_CLUSTER}")
        if self.nats_cluster > 1 and self.nats:
            _fail("nats_cluster", "given together with --nats", "leave out --nats to have pdserve up start the cluster, "
                  "or give --nats every URL of your own cluster, comma-separated")
        self._check_security()

    def _check_security(self) -> None:
        """What is wrong with the security options, before anything starts."""
        if self.api_keys_file:
            try:
                if not read_api_keys(self.api_keys_file):
                    raise ConfigError(f"--api-keys-file {self.api_keys_file}: no key in it; put one API key per line")
            except OSError as e:
                raise ConfigError(f"--api-keys-file {self.api_keys_file}: cannot read it ({e.strerror})") from e
        if self.nats_password and not self.nats_user:
            raise ConfigError("--nats-password needs --nats-user")
        if not self.nats and (self.nats_user or self.nats_token or self.nats_credentials_dir):
            raise ConfigError("--nats-user/--nats-token/--nats-credentials-dir are for an external NATS (--nats URL): "
                              "the NATS server pdserve up starts gives every role its own identity by itself")
        if self.nats_credentials_dir and (self.nats_user or self.nats_token):
            raise ConfigError("give the NATS identities one way: --nats-credentials-dir, or --nats-user/--nats-token")
        if self.nats_credentials_dir:
            for role in nats_auth.ROLES:
                path = nats_auth.credentials_path(self.nats_credentials_dir, role)
                try:
                    nats_auth.read_credentials_file(path)
                except nats_auth.CredentialsFileError as e:
                    raise ConfigError(f"--nats-credentials-dir: {e}; write the directory with "
                                      "`pdserve nats-config --out DIR`") from e
        if not self.nats and (self.nats_tls_ca or self.nats_tls_cert or self.nats_tls_key):
            raise ConfigError("--nats-tls-* are for an external NATS with TLS (--nats URL); the NATS server pdserve up "
                              "starts listens on 127.0.0.1 without TLS")
