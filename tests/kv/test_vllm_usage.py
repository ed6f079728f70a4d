"""The vLLM engine's leak-accounting surface without an engine: the connector's scheduler side publishes the
block pool's usage, the worker side its held blocks, and VllmEngine.stats() combines them.

A fake block pool stands in for vLLM's (the same two members the publisher reads); no vLLM engine starts.
"""

from __future__ import annotations

import orjson
import pytest

pytest.importorskip("vllm")

from pdserve.engine.vllm_engine import VllmEngine  # noqa: E402
from pdserve.kv.connector_stats import PoolUsagePublisher, pool_stats_path, read_published_stats  # noqa: E402


class FakeBlockPool:
    """vLLM's BlockPool as the publisher sees it: num_gpu_blocks includes the null block."""

    def __init__(self, num_gpu_blocks: int):
        self.num_gpu_blocks = num_gpu_blocks
        self.num_free = num_gpu_blocks - 1

    def get_num_free_blocks(self) -> int:
        return self.num_free


def test_pool_usage_is_published_and_removed(tmp_path):
    pool = FakeBlockPool(101)
    path = str(tmp_path / "kv-stats.json.pool")
    publisher = PoolUsagePublisher(pool, path)
    publisher.start()
    try:
        first = read_published_stats(path)
        assert first["num_free_blocks"] == 100 and first["kv_usage"] == 0.0
        pool.num_free = 75  # running requests took 25 blocks
        publisher.publish()
        assert read_published_stats(path)["kv_usage"] == pytest.approx(0.25)
    finally:
        publisher.stop()
    assert read_published_stats(path) is None  # nothing stale left for a later worker of the same id


def engine_reading(tmp_path) -> VllmEngine:
    """A VllmEngine that never started: only its stats plumbing is used."""
    engine = VllmEngine.__new__(VllmEngine)
    engine._stats_path = str(tmp_path / "kv-stats.json")
    engine._stats = {}
    engine._running = {"r1", "r2"}
    engine._num_local_prefills = 0
    engine._num_cached_tokens = 0
    engine._prefix_counters = {}
    return engine


def test_engine_stats_combine_held_blocks_and_pool_usage(tmp_path):
    engine = engine_reading(tmp_path)
    worker_side = {"num_held_blocks": 8, "num_total_blocks": 100, "num_kv_bytes_sent": 1024}
    engine._set_stats(worker_side)
    stats = engine.stats()
    # Before the pool was published: usage from the held blocks alone.
    assert stats["num_held_blocks"] == 8 and stats["kv_usage"] == pytest.approx(0.08)
    assert stats["num_free_blocks"] == 92 and stats["num_running"] == 2

    with open(pool_stats_path(engine._stats_path), "wb") as f:
        f.write(orjson.dumps({"num_free_blocks": 60, "kv_usage": 0.4, "published_at": 0}))
    engine._set_stats(worker_side)
    stats = engine.stats()
    # The pool's usage counts running requests' blocks too (40 in use, 8 of them held for transfers).
    assert stats["kv_usage"] == pytest.approx(0.4) and stats["num_free_blocks"] == 60
    assert stats["num_held_blocks"] == 8 and stats["num_kv_bytes_sent"] == 1024

    # The worker half released holds of 20 blocks that vLLM frees at the engine's next step (an idle engine takes
    # one only when a request comes): they count as free, up to the cache's size.
    engine._set_stats({**worker_side, "num_released_blocks": 20})
    stats = engine.stats()
    assert stats["num_free_blocks"] == 80 and stats["kv_usage"] == pytest.approx(0.4 - 20 / 99)
    engine._set_stats({**worker_side, "num_released_blocks": 200})
    assert engine.stats()["num_free_blocks"] == 99


def test_scheduler_side_publishes_once_vllm_binds_its_pool(tmp_path):
    """vLLM calls bind_gpu_block_pool on the scheduler-side connector; shutdown stops the publisher."""

    from pdserve.kv.connector_scheduler import ConnectorScheduler

    stats_path = str(tmp_path / "kv-stats.json")
    side = ConnectorScheduler(None, {"worker_id": "p1", "stats_path": stats_path}, "refcount")
    side.bind_block_pool(FakeBlockPool(11))
    try:
        assert read_published_stats(pool_stats_path(stats_path))["num_free_blocks"] == 10
    finally:
        side.shutdown()
    assert read_published_stats(pool_stats_path(stats_path)) is None
