"""Mooncake's transfer engine in TCP mode, as one more variant of benchmarks/transfer.py.

Driven the way vLLM's MooncakeConnector drives it (mooncake/mooncake_connector_v1.py in the wheel), except
that the decode side pulls, as pdserve's does:
  - each side: TransferEngine().initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") (no metadata service:
    a peer is named "host:rpc_port", get_rpc_port()), then batch_register_memory() over its pool's arrays;
  - the decode side, once per repetition: one batch_transfer_sync_read(peer, local_ptrs, remote_ptrs, lengths)
    with one entry per run of consecutive blocks in each segment array (vLLM's group_concurrent_contiguous),
    so a full pull of N blocks with S segments per block is S entries.
The synchronous batch call waits by polling the batch's status in a loop without sleeping (the Python
binding's batchTransferSync in transfer_engine_py.cpp; get_batch_transfer_status waits the same way): one core
of the decode side spins for the whole transfer. That is part of what Mooncake costs from Python, so it stays
in its "cpu recv" figure, but on a machine with few cores the spinning thread also competes with Mooncake's
own I/O threads.
Mooncake's own MC_* environment variables (MC_TCP_SLICE_SIZE, MC_TCP_LANES_PER_PEER, ...) reach both sides;
MC_LOG_LEVEL defaults to ERROR here (initialize still logs a harmless "Local segment descriptor not found").
Every failure (the wheel missing, a system library missing, initialize or a transfer failing) becomes a
MooncakeUnavailable with the reason: the benchmark reports it and carries on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.kv import ArrayBlockPool

HOST = "127.0.0.1"
PROTOCOL = "tcp"
API = "batch_transfer_sync_read"
NOTE = ("decode side pulls; one batch call per repetition, one entry per run of consecutive blocks per segment "
        "array; the sync call busy-polls its completion on one decode-side core (counted in cpu_recv)")


class MooncakeUnavailable(Exception):
    """Mooncake cannot take part in this run; str() is the reason."""


def version() -> str | None:
    from importlib import metadata

    for dist in ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


# Where `make` puts the Debian packages of libibverbs and libnl (scripts/fetch-mooncake-libs.sh) when the
# system lacks them; loaded by absolute path, in dependency order, before mooncake.engine needs them.
FETCHED_LIBS = Path(sys.prefix) / "mooncake-libs"
_PRELOAD = ("lib/x86_64-linux-gnu/libnl-3.so.200", "usr/lib/x86_64-linux-gnu/libnl-route-3.so.200",
            "usr/lib/x86_64-linux-gnu/libibverbs.so.1")


def preload_fetched_libs() -> None:
    if ctypes.util.find_library("ibverbs") or not FETCHED_LIBS.is_dir():
        return
    for lib in _PRELOAD:
        path = FETCHED_LIBS / lib
        if path.exists():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def new_engine():
    """An initialised TransferEngine in TCP mode with P2P handshake, one per pool (engines are cheap, and a
    fresh one never holds a stale descriptor of an earlier peer that happened to get the same port)."""
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        preload_fetched_libs()
        from mooncake.engine import TransferEngine
    except (ImportError, OSError) as e:
        hint = (" (the wheel links the system's libibverbs: apt-get install libibverbs1, or "
                f"scripts/fetch-mooncake-libs.sh {FETCHED_LIBS})") if "ibverbs" in str(e) else ""
        raise MooncakeUnavailable(f"mooncake.engine does not import: {e}{hint}") from e
    engine = TransferEngine()
    rc = engine.initialize(HOST, "P2PHANDSHAKE", PROTOCOL, "")
    if rc != 0:
        raise MooncakeUnavailable(f"TransferEngine.initialize({HOST!r}, 'P2PHANDSHAKE', {PROTOCOL!r}, '') "
                                  f"returned {rc}")
    return engine


def register(engine, pool: ArrayBlockPool) -> list[int]:
    """Registers each array of the pool (numpy, C-contiguous) and returns their base addresses."""
    addresses = [int(array.ctypes.data) for array in pool._arrays]
    rc = engine.batch_register_memory(addresses, [int(array.nbytes) for array in pool._arrays])
    if rc != 0:
        raise MooncakeUnavailable(f"batch_register_memory returned {rc}")
    return addresses


def block_runs(block_ids: Sequence[int], peer_block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first local block, first peer block, number of blocks) for each run consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for local, peer in zip(block_ids, peer_block_ids):
        if runs and runs[-1][0] + runs[-1][2] == local and runs[-1][1] + runs[-1][2] == peer:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((local, peer, 1))
    return runs


# ---------------------------------------------------------------------------------------- prefill side


class MooncakeSource:
    """The prefill side: its pool registered with an engine of its own. Keep it referenced while serving."""

    def __init__(self, pool: ArrayBlockPool) -> None:
        self.engine = new_engine()
        self.addresses = register(self.engine, pool)
        self.session = f"{HOST}:{self.engine.get_rpc_port()}"

    @classmethod
    def start(cls, pool: ArrayBlockPool) -> tuple[MooncakeSource | None, dict]:
        """The source and what the decode side needs ({"session", "addresses"}), or None and {"error": why}."""
        try:
            source = cls(pool)
        except Exception as e:  # noqa: BLE001 - any failure here only takes Mooncake out of the run
            return None, {"error": f"prefill side: {e}" if isinstance(e, MooncakeUnavailable) else
                          f"prefill side: {type(e).__name__}: {e}"}
        return source, {"session": source.session, "addresses": source.addresses}


# ---------------------------------------------------------------------------------------- decode side


class MooncakeReader:
    """The decode side: pulls blocks of the source's pool into its own registered pool."""

    def __init__(self, source: dict, pool: ArrayBlockPool) -> None:
        if "error" in source:
            raise MooncakeUnavailable(source["error"])
        self.session, self.peer_addresses = source["session"], source["addresses"]
        self.segment_nbytes = pool.segment_nbytes
        self.engine = new_engine()
        self.addresses = register(self.engine, pool)

    def read(self, block_ids: Sequence[int], peer_block_ids: Sequence[int]) -> None:
        """Copies the peer's blocks peer_block_ids[i] into our blocks block_ids[i]; one batch, synchronous."""
        local, remote, lengths = [], [], []
        for first, peer_first, count in block_runs(block_ids, peer_block_ids):
            for k, nbytes in enumerate(self.segment_nbytes):
                local.append(self.addresses[k] + first * nbytes)
                remote.append(self.peer_addresses[k] + peer_first * nbytes)
                lengths.append(count * nbytes)
        rc = self.engine.batch_transfer_sync_read(self.session, local, remote, lengths)
        if rc != 0:
            raise MooncakeUnavailable(f"{API}({self.session!r}, {len(lengths)} entries) returned {rc}")

    def close(self) -> None:
        self.engine.batch_unregister_memory(self.addresses)
        self.engine = None
