"""The files through which vLLM's engine processes tell the pdserve worker how their KV is used.

The worker side of the connector publishes its transfer counters at kv_connector_extra_config["stats_path"],
the scheduler side the block pool's usage beside it (pool_stats_path); the pdserve worker reads both with
read_published_stats. Separate from either side because both sides write these files and the pdserve worker,
a third process, reads them: it imports this module without the connector or vLLM's connector base.
Files instead of collective_rpc: every collective_rpc makes vLLM's worker process busy-poll its message queue
for ~1 s afterwards (a full core, measured).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable

import orjson

logger = logging.getLogger(__name__)

STATS_PUBLISH_S = 0.5


class StatsPublisher:
    """`snapshot()` published at `path` as JSON (with "published_at") every STATS_PUBLISH_S when it changed, from
    a thread of its own (named `name`); stop() ends the thread and removes the file, so that nothing stale is
    left for a later worker of the same id. snapshot() must be safe to call from that thread."""

    def __init__(self, snapshot: Callable[[], dict], path: str, name: str):
        self.snapshot = snapshot
        self.path = path
        self.name = name
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict | None = None

    def publish(self) -> None:
        snapshot = self.snapshot()
        if snapshot != self._last:
            write_json(self.path, {**snapshot, "published_at": time.time()})
            self._last = snapshot

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(STATS_PUBLISH_S):
            try:
                self.publish()
            except Exception:  # a full disk must not take the engine down; retried next round
                logger.exception("kv connector: could not publish %s to %s", self.name, self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class PoolUsagePublisher(StatsPublisher):
    """KV usage of the whole engine, as vLLM's scheduler sees its block pool (running and waiting requests'
    blocks and the blocks held for transfers alike), published for the pdserve worker as {"num_free_blocks",
    "kv_usage", "published_at"} and what `extra` adds.

    The worker side only knows the blocks held for transfers (num_held_blocks); the pool lives with the
    scheduler, in the EngineCore process. Reading the free count from this thread is a read of one int
    that vLLM's engine thread updates: a snapshot, never a torn value.
    """

    def __init__(self, block_pool: Any, path: str, extra: Callable[[], dict] | None = None):
        super().__init__(self.usage, path, "pdserve-kv-usage")
        self.block_pool = block_pool
        self.extra = extra  # more counters of the scheduler side (the host tier's), safe to read from this thread

    def usage(self) -> dict:
        usable = self.block_pool.num_gpu_blocks - 1  # vLLM's null block is neither free nor usable
        free = self.block_pool.get_num_free_blocks()
        extra = self.extra() if self.extra is not None else {}
        return {"num_free_blocks": free, "kv_usage": 1.0 - free / usable if usable > 0 else 0.0, **extra}



def pool_stats_path(stats_path: str) -> str:
    """Where the scheduler side publishes the block pool's usage, next to the worker side's counters."""
    return f"{stats_path}.pool"


def write_json(path: str, value: dict) -> None:
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


