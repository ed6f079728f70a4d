"""The "nixl" byte path: the decode side READs the prefill side's blocks with NIXL (NVIDIA's inference transfer
library), whose UCX backend uses RDMA verbs where the hosts have RDMA NICs and TCP (or same-host transports)
where they do not. The pull's protocol is the shm path's (wire.py): over the control connection the endpoint
describes each batch (where its pieces lie in its memory), and the client READs those pieces one-sided.

Where a READ lands. A pull that fails (deadline, cancel) must leave nothing writing into blocks the engine then
recomputes or gives to another request, and NIXL cannot promise that: measured here (UCX over TCP), a READ from a
frozen prefill process was released without error, its remote agent removed, even the whole agent deleted, and its
bytes still landed once that process ran again. So:
- a caller that can hold its blocks until such READs end gives the pull a ReadFence (read_fence.py; the engines
  do): host KV is READ straight into the blocks, in batches of 64 MiB, with no checksums; the pull ends with the
  endpoint's confirmation that it held the transfer throughout ("done", as on the cuda-ipc path: only a release
  could have let the blocks change under the READ), and READs still running after a failure go to the fence.
  Measured on 2 cores (UCX over TCP, benchmarks/transfer.py): 0.82-1.09x NIXL alone, 0.90-1.17x pdserve's tcp path;
- without one, READs land in buffers of the client's own (nixl_landing.py), are checked there against the
  checksums the endpoint took as it described the batch, and copied into the blocks; a buffer whose READ was
  abandoned is reused only once NIXL says that READ ended. That copy and the checksums cost ~150 core-ms per GB
  over both sides here (0.6-0.7x tcp).

GPU KV (a pool with device_segments on a CUDA device, e.g. vLLM's on a GPU) goes device to device: the endpoint
registers the device allocations behind its KV tensors (VRAM) and describes each batch as device pieces, with no
checksums (hashing on the device would cost a pass over the bytes); the client READs them into landing buffers in
its own GPU's memory, copies them into its blocks with cuda_ipc's copy kernel and, as on the cuda-ipc path, asks the
endpoint whether the transfer was still held once every READ had ended ("done"): only a release meanwhile could
have let the blocks change under the READ. UCX moves VRAM with GPUDirect RDMA where the NICs can, with its
cuda_ipc transport between GPUs of one host, and through host memory over TCP (cuda_copy) elsewhere. Pinned host
staging, the tcp path's way for GPU KV, is not used.

Trust: what a NIXL peer can read, and how pdserve limits it.
- The endpoint registers its whole KV pool (host memory, or the GPU allocations of GPU KV) with its agent once. Its agent metadata holds the UCX remote keys of
  that registration: a process that has the metadata can READ any byte of the pool (every request's KV,
  whoever's it is) for as long as the endpoint runs, whatever the descriptors say; nothing outside the pool.
  NIXL checks descriptors against the registration on the reader's side only, so that check protects no one.
- pdserve therefore never publishes the metadata (not on NATS, not in heartbeats): an endpoint hands it, on the
  control connection, only to a puller that presented a valid transfer id and token, i.e. one that was sent a
  KV-ready message on NATS. Each agent has a random name per endpoint start, so metadata of a past run is useless.
- A NATS without credentials lets anyone read KV-ready messages and so obtain a token, then the metadata, then
  the whole pool for good (over tcp/shm a token opens one transfer's blocks until it is released). So the nixl
  path is offered only on an authenticated NATS, unless the operator asks for it with --kv-transport nixl, which
  logs a WARNING (transport_offered()).
- The NIXL listener thread (metadata exchange over a socket of its own) stays off: metadata moves only as above.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import importlib
import itertools
import logging
import os
import secrets
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pdserve.kv.errors import TransferError, TransferTimeout
from pdserve.kv.pool import coalesced

logger = logging.getLogger(__name__)

# UCX's TCP transport (between hosts without RDMA NICs) with its defaults moved 0.66-0.72 GB/s here (NIXL alone,
# 256 MiB in 8 MiB READs between two processes); with these, 2.3-2.9 GB/s in the same test (64k segments: 1.2-1.4,
# 4m buffers with 256k segments: 2.2-2.6). Set only where the operator set nothing; RDMA transports ignore them.
UCX_TCP_DEFAULTS = {"UCX_TCP_SNDBUF": "8m", "UCX_TCP_RCVBUF": "8m", "UCX_TCP_TX_SEG_SIZE": "512k",
                    "UCX_TCP_RX_SEG_SIZE": "512k"}
# GPU KV between processes of one host: UCX 1.23 turns its cuda_ipc zero-copy GET off where it sees no NVLink (a
# one-GPU host) and emulates the READ over tcp on loopback: 0.5 GB/s against 638 GB/s with it on (H200, 64 MiB,
# benchmarks/nixl_vram.py). Hosts with NVLink have it on already.
UCX_CUDA_DEFAULTS = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}
POLL_S = 0.0005  # between looks at a READ in flight: busy polling would take a core from UCX's own thread
# ... and for a large READ up to this, by its size: each look costs the polling thread ~0.3 ms of CPU here (measured
# on 64 MiB READs over UCX tcp, 2 cores: the polling thread used 14 CPU ticks per 30 READs at 2 ms, 23-25 at 0.5 ms)
POLL_MAX_S = 0.002
POLL_BYTES_PER_S = 16e9  # a READ of n bytes is looked at every n / this (within POLL_S .. POLL_MAX_S)
_import_error: str | None = None


@functools.lru_cache(maxsize=None)
def _nixl():
    """The nixl module, imported on first use (it loads UCX and its plugins: ~0.2 s); the environment UCX reads is
    settled once, here, not again for every agent."""
    if "UCX_MODULES" not in os.environ:
        from pdserve import rdma_devices

        if not rdma_devices.list_devices():
            # Read by UCX when its libraries load, so set before the import. Any process that made a UCX agent
            # died at exit (SIGSEGV in the destructor of the wheel's bundled libnl-route, which UCX's InfiniBand
            # module loads; gdb: rtnl_tc_unregister from _dl_fini; nixl-cu12 1.5.1, UCX 1.23, measured here). The
            # InfiniBand module has nothing to do on a host without an RDMA device, so it is not loaded there. On
            # hosts with one UCX keeps its defaults (not measured: no such host here).
            os.environ["UCX_MODULES"] = "^ib"
    for name, value in UCX_TCP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if os.path.exists("/dev/nvidiactl") and "cuda_ipc" in os.environ.get("UCX_TLS", "cuda_ipc"):
        # Only where UCX may load its cuda_ipc transport. Where it then does not (UCX_TLS narrowed in a child
        # process that inherits this environment), UCX would print "unused environment variable" on stdout, a
        # CLI's and a test's channel: that warning is off when pdserve set the variable itself.
        for name, value in UCX_CUDA_DEFAULTS.items():
            if name not in os.environ:
                os.environ[name] = value
                os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    api = None
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        # `nixl` is the meta package's shim that picks a build by the CUDA found; the builds themselves (nixl-cu12,
        # which make install installs, or nixl-cu13) import under their own names.
        try:
            api = importlib.import_module(name)
            break
        except ImportError as e:
            missing = e
    if api is None:
        raise missing

    # NIXL prints its Python logging on stdout (an INFO line per agent): stdout is a CLI's and a test's channel.
    # Its records go through this process's logging instead, from WARNING (NIXL_LOG_LEVEL still decides if set).
    nixl_logger = logging.getLogger("nixl")
    if nixl_logger.handlers:
        for handler in list(nixl_logger.handlers):
            nixl_logger.removeHandler(handler)
        nixl_logger.propagate = True
        if not os.environ.get("NIXL_LOG_LEVEL"):
            nixl_logger.setLevel(logging.WARNING)
    return api


def why_unavailable() -> str | None:
    """None when NIXL imports and can make a UCX agent here; else why not, in words for a log line."""
    global _import_error
    if _import_error is None:
        try:
            api = _nixl()
        except Exception as e:  # ImportError, or the native library failing to load
            _import_error = (f"NIXL does not load here ({type(e).__name__}: {e}); install the nixl-cu12 (or "
                             "nixl-cu13) wheel: make install does")
            return _import_error
        try:  # the UCX backend made once, as agents make it (no progress thread): it fails for want of transports
            probe = api.nixl_agent(f"probe-{secrets.token_hex(4)}", api.nixl_agent_config(
                enable_prog_thread=False, enable_listen_thread=False, backends=[]))
            if "UCX" not in probe.get_plugin_list():
                _import_error = f"NIXL has no UCX plugin here (plugins: {probe.get_plugin_list()})"
            else:
                probe.create_backend("UCX", {})
                _import_error = ""
        except Exception as e:
            _import_error = (f"NIXL cannot make its UCX backend here ({type(e).__name__}: {e}; UCX_TLS="
                             f"{os.environ.get('UCX_TLS', 'unset')}): UCX found no transport it can use; unset UCX_TLS "
                             "or name transports this host has (on a host with GPUs NIXL also wants cuda_copy in it, "
                             "e.g. UCX_TLS=tcp,cuda_copy)")
    return _import_error or None


def transport_offered(kv_transport: str, nats_authenticated: bool, rdma_active: bool | None = None) -> bool:
    """Whether a worker's endpoint offers the nixl path (see the module's note on trust). Asked for
    (--kv-transport nixl): where NIXL loads, on a NATS without credentials too, with a WARNING. auto: only where it
    can pay off, i.e. this host has an active RDMA port (an agent costs a thread and start-up time; pullers on
    hosts without RDMA never choose it), and only on an authenticated NATS. rdma_active None: look (rdma_devices)."""
    if kv_transport not in ("auto", "nixl"):
        return False
    if kv_transport == "auto":
        if rdma_active is None:
            from pdserve import rdma_devices

            rdma_active = rdma_devices.has_active_port(rdma_devices.list_devices())
        if not rdma_active:
            return False
    why = why_unavailable()
    if why is not None:
        log = logger.warning if kv_transport == "nixl" else logger.info
        log("kv nixl path not offered: %s", why)
        return False
    if not nats_authenticated:
        if kv_transport == "auto":
            logger.info("kv nixl path not offered: NATS has no credentials, and a peer that reads a KV-ready message "
                        "could then read this worker's whole KV pool over NIXL; use authenticated NATS (pdserve up "
                        "does), or --kv-transport nixl to offer it anyway")
            return False
        logger.warning("kv nixl path offered on a NATS without credentials (--kv-transport nixl): anyone who can read "
                       "the bus can obtain a transfer token, then this worker's NIXL metadata, and then read its whole "
                       "KV pool for as long as it runs; give NATS credentials (pdserve nats-config)")
    return True


@dataclass(frozen=True)
class PoolMemory:
    """What NIXL registers of a pool: `kind` in NIXL's names ("DRAM", "VRAM"), the GPU's index for VRAM (0 for
    DRAM), and the regions as [(address, nbytes)]."""

    kind: str
    device: int
    regions: list[tuple[int, int]]


def pool_memory(pool) -> PoolMemory | None:
    """The pool's memory to register once: for GPU KV (device_segments on a CUDA device), the device allocations
    behind its segment arrays (each once: vLLM's K and V planes of a layer share one); else its fixed host memory.
    None when there is none (a staging pool's host slots change hands, a pool of separate bytearrays would be many
    regions)."""
    segments = getattr(pool, "device_segments", None)
    if segments and segments[0].device.type == "cuda":
        allocations = {}
        for t in segments:
            storage = t.untyped_storage()
            allocations[storage.data_ptr()] = storage.nbytes()
        return PoolMemory("VRAM", segments[0].device.index or 0, sorted(allocations.items()))
    regions = getattr(pool, "memory_regions", None)
    if regions is None or hasattr(pool, "row_of"):
        return None
    return PoolMemory("DRAM", 0, [(int(a), int(n)) for a, n in regions()])


def device_iov(segments, block_ids) -> np.ndarray:
    """GPU KV: [address, length] of each block's piece of each segment array (uint8 [num_blocks, bytes] tensors),
    segment-major (segment k of every block, then k+1: the order of a batch everywhere), adjacent pieces joined."""
    rows = np.asarray(block_ids, dtype=np.uint64)
    parts = [np.stack([t.data_ptr() + rows * (t.stride(0) * t.element_size()),
                       np.full(len(rows), t.shape[1] * t.element_size(), dtype=np.uint64)], axis=1)
             for t in segments]
    return coalesced(np.concatenate(parts))


PROGRESS_DELAY_US = 100  # see _make_agent
_live: weakref.WeakSet = weakref.WeakSet()  # agents not closed yet


@atexit.register
def _close_live_agents() -> None:
    """A NIXL agent still alive when the interpreter exits crashed it (SIGSEGV, measured): its progress thread
    outlived what it uses. Agents not closed by their owner are closed here, before that."""
    for agent in list(_live):
        with contextlib.suppress(Exception):
            agent.close()
_making = threading.Lock()


def _make_agent(name: str):
    """A NIXL agent with UCX, its progress thread on (UCX over TCP serves READs in software: the serving side must
    progress) and pausing PROGRESS_DELAY_US between rounds. NIXL's Python API fixes that pause at 0, a busy loop:
    measured here, an idle agent then burns a whole core (0.87-1.0 CPU-s per s); at 100 us, 0.015-0.02 CPU-s per s
    and the same throughput (1.0-1.1 GB/s in both, 256 MiB over UCX TCP between two processes). The pause is set on
    the way to NIXL's native constructor, as the API exposes no parameter for it."""
    api = _nixl()
    native = api.nixlBind

    class _WithProgressDelay:
        def __getattr__(self, attribute):
            return getattr(native, attribute)

        @staticmethod
        def nixlAgent(agent_name, config):
            config.pthrDelay = PROGRESS_DELAY_US
            return native.nixlAgent(agent_name, config)

    with _making:  # the module attribute is swapped for the constructor's call only
        api.nixlBind = _WithProgressDelay()
        try:
            return api.nixl_agent(name, api.nixl_agent_config(
                enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"],
                sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        finally:
            api.nixlBind = native


class NixlAgent:
    """One NIXL agent with its UCX backend and the pool memory it registered.

    Thread-safe (NIXL's strict sync mode): pulls run on several worker threads. Serving side: `metadata` is what a
    puller needs; nothing else is done here (the reads are one-sided). Pulling side: remote agents are added
    from the metadata endpoints send (`know`), and `read` moves pieces, bounded by a deadline and a cancel check.
    """

    def __init__(self, role: str) -> None:
        self.name = f"pdserve-{role}-{os.getpid()}-{secrets.token_hex(6)}"
        self._agent = _make_agent(self.name)
        _live.add(self)
        self._registered: dict[int, tuple[object, weakref.finalize | None]] = {}  # id(pool) -> its registration
        self._remote: dict[str, str] = {}  # endpoint address -> the name of the agent its metadata added
        self._lock = threading.Lock()
        self._after_next_post: Callable[[], None] | None = None  # test hook

    def register(self, pool) -> None:
        """Register the pool's memory (once per pool; unregistered when the pool is collected or at close()).
        ValueError when the pool has none to register (pool_memory)."""
        with self._lock:
            if id(pool) in self._registered:
                return
            memory = pool_memory(pool)
            if memory is None or not memory.regions:
                raise ValueError(f"{type(pool).__name__} has no fixed memory NIXL can register")
            handle = self._agent.register_memory([(a, n, memory.device, "") for a, n in memory.regions],
                                                 memory.kind)
            try:
                done = weakref.finalize(pool, self._forget, id(pool))
            except TypeError:  # a pool that takes no weak references stays registered until close()
                done = None
            self._registered[id(pool)] = (handle, done)

    def _forget(self, pool_id: int) -> None:
        with self._lock:
            entry = self._registered.pop(pool_id, None)
        if entry is not None:
            self._agent.deregister_memory(entry[0])

    def register_region(self, address: int, nbytes: int, kind: str = "DRAM", device: int = 0) -> object:
        """Register one region of host memory (or of GPU `device`'s, kind "VRAM") until deregister_region()."""
        return self._agent.register_memory([(address, nbytes, device, "")], kind)

    def deregister_region(self, registration: object) -> None:
        self._agent.deregister_memory(registration)

    @property
    def metadata(self) -> bytes:
        """What a peer needs to READ what is registered here (see the module's note on trust)."""
        return self._agent.get_agent_metadata()

    def close(self) -> None:
        """Forget remote agents and unregister all memory (no READ of it succeeds afterwards); idempotent."""
        if self._agent is None:
            return
        with self._lock:
            for name in set(self._remote.values()):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:  # already gone with its peer
                    logger.debug("nixl: removing remote agent %s failed", name, exc_info=True)
            self._remote.clear()
            registered, self._registered = self._registered, {}
        for handle, done in registered.values():
            if done is not None:
                done.detach()
            self._agent.deregister_memory(handle)
        _live.discard(self)
        self._agent = None  # the native agent ends here (its progress thread joined), not at interpreter exit

    # ---- pulling side

    def agent_for(self, address: str) -> str | None:
        """The remote agent name this side knows for an endpoint address, if any."""
        with self._lock:
            return self._remote.get(address)

    def know(self, address: str, name: str, metadata_b64: str | None) -> str:
        """Make sure the endpoint's agent `name` is known here: from its metadata when it sent some (its first
        description on a connection, or after it restarted with a new name); ValueError when it sent none and the
        name is unknown."""
        with self._lock:
            if self._remote.get(address) == name:
                return name
            if not metadata_b64:
                raise ValueError(f"endpoint names NIXL agent {name!r} but sent no metadata for it")
            added = self._agent.add_remote_agent(base64.b64decode(metadata_b64))
            added = added.decode() if isinstance(added, bytes) else added
            if added != name:
                raise ValueError(f"metadata of NIXL agent {added!r} sent as {name!r}")
            old = self._remote.get(address)
            self._remote[address] = name
        if old is not None:
            try:
                self._agent.remove_remote_agent(old)  # the endpoint at that address restarted
            except Exception:
                logger.debug("nixl: removing remote agent %s failed", old, exc_info=True)
        return name

    def post_read(self, remote_agent: str, local: np.ndarray, remote: np.ndarray, *, local_kind: str = "DRAM",
                  local_device: int = 0, remote_kind: str = "DRAM", remote_device: int = 0) -> object:
        """Start a READ of `remote` ([address, length] pieces in the peer) into `local` (pieces here, the same
        count and lengths: shm.aligned()); each side's memory kind ("DRAM", "VRAM") and GPU index as registered.
        Returns its handle for wait()."""
        agent = self._agent
        try:
            local_descs = agent.get_xfer_descs([(int(a), int(n), local_device) for a, n in local], local_kind)
            remote_descs = agent.get_xfer_descs([(int(a), int(n), remote_device) for a, n in remote], remote_kind)
            handle = agent.initialize_xfer("READ", local_descs, remote_descs, remote_agent)
        except Exception as e:  # nixl's own errors: not found (unregistered memory), remote disconnected
            raise TransferError(f"NIXL could not prepare the READ ({type(e).__name__}: {e})") from e
        try:
            if agent.transfer(handle) == "ERR":
                raise TransferError("NIXL could not post the READ")
        except BaseException as e:
            with contextlib.suppress(Exception):
                agent.release_xfer_handle(handle)  # never posted: nothing can land
            if isinstance(e, Exception) and not isinstance(e, TransferError):
                raise TransferError(f"NIXL could not post the READ ({type(e).__name__}: {e})") from e
            raise
        hook, self._after_next_post = self._after_next_post, None
        if hook is not None:
            hook()
        return handle

    def stop_process_after_next_read_for_tests(self, pid: int) -> None:
        """Test hook: right after the next READ is posted, stop process `pid` (SIGSTOP; the test sends SIGCONT): a
        prefill process frozen while a READ of its blocks is in flight."""
        self._after_next_post = lambda: os.kill(pid, signal.SIGSTOP)

    def wait(self, handle: object, deadline: float, check: Callable[[], None], nbytes: int = 0) -> None:
        """Until the READ (of nbytes) is done (its handle then released); TransferError when it fails,
        TransferTimeout past `deadline` (monotonic), or whatever check() raises (cancellation). After a failure the
        READ may still be in flight: the caller holds its landing buffer or its blocks until ended()."""
        agent = self._agent
        poll_s = min(POLL_MAX_S, max(POLL_S, nbytes / POLL_BYTES_PER_S))
        for spins in itertools.count():
            try:
                state = agent.check_xfer_state(handle)
            except Exception as e:  # nixl raises for a peer that disconnected mid-READ
                raise TransferError(f"the NIXL READ failed ({type(e).__name__}: {e})") from e
            if state == "DONE":
                break
            if state == "ERR":
                raise TransferError("the NIXL READ failed (the prefill worker's process or its host went away)")
            if time.monotonic() > deadline:
                raise TransferTimeout("the NIXL READ did not complete by the pull's deadline")
            if spins % 64 == 0:
                check()
            time.sleep(poll_s)
        agent.release_xfer_handle(handle)

    def ended(self, handle: object) -> bool:
        """Whether an abandoned READ has ended (its handle is then released): only then may its buffer be reused."""
        try:
            if self._agent.check_xfer_state(handle) == "PROC":
                return False
        except Exception:  # failed for good
            pass
        with contextlib.suppress(Exception):
            self._agent.release_xfer_handle(handle)
        return True


def encode_metadata(metadata: bytes) -> str:
    return base64.b64encode(metadata).decode()
