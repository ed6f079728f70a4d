"""The worker half of pdserve's vLLM KV connector: serves held blocks and pulls remote ones.

vLLM calls it in the process that owns the KV tensors; it owns the block pool over them, the transfer endpoint
(prefill: serves the blocks the scheduler half holds) and the transfer client (decode: pulls into the blocks the
scheduler half allocated, on an asyncio loop thread). Kept apart from the scheduler half (connector_scheduler.py),
which runs in another process and needs none of this data plane. PdserveConnector (vllm_connector.py) delegates
to it on the WORKER role; the pdserve worker reaches it through PdserveWorkerExtension (vllm_worker_ext.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from pdserve.kv import PeerUnreachable, TransferClient, TransferEndpoint, TransferError, TransferRefused
from pdserve.kv.connector_host_tier import HostTierStore, tier_size
from pdserve.kv.connector_metadata import LoadSpec, PdserveConnectorMetadata, PdserveHandshake, PdserveWorkerMetadata
from pdserve.kv.client import DEFAULT_CONNECT_TIMEOUT_S
from pdserve.kv.connector_stats import StatsPublisher
from pdserve.kv.read_fence import ReadFence
from pdserve.kv.vllm_pool import CpuKVPool, make_kv_block_pool
from pdserve.kv.vllm_reports import LoadReportSender
from pdserve.kv.wire import PATHS
from pdserve.protocol import KVLayout, KVTransferParams

if TYPE_CHECKING:
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig


logger = logging.getLogger(__name__)

# A pull that finds its transfer unknown is retried this long: the prefill worker allows a transfer one
# engine step after it hands out the params, so a very fast decode may knock before the door exists.
_UNKNOWN_RETRY_S = 1.0
_UNKNOWN_RETRY_INTERVAL_S = 0.02
_MAX_REPORTS = 4096


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
    num_tokens: int = 0  # LoadSpec.num_tokens
    # READs of a failed pull (nixl, straight into the blocks) still running: vLLM keeps a request that waits for
    # remote KV, aborted or not, and its blocks, until finished_recving lists it, so it is listed only once they end
    fence: ReadFence = field(default_factory=ReadFence)


class ConnectorWorker:
    """Owns the block pool over vLLM's KV tensors, the transfer endpoint (its own thread), the transfer
    client and an asyncio loop thread for pulls. vLLM calls in from the worker's main thread; pulls finish
    on the loop thread and are handed over through a locked deque, so transfer_results() never blocks."""

    def __init__(self, layout: KVLayout, model_name: str, extra: dict, hold_mode: str,
                 kv_cache_config: "KVCacheConfig"):
        self.layout = layout
        self.model_name = model_name
        self.hold_mode = hold_mode
        self.num_blocks = kv_cache_config.num_blocks
        self.bind_host = str(extra.get("bind_host", "127.0.0.1"))
        self.advertise_host = str(extra.get("advertise_host", "127.0.0.1"))
        self.pull_timeout_s = float(extra.get("pull_timeout_s", 30.0))
        self.connect_timeout_s = float(extra.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S))
        self.transport = str(extra.get("transport", "auto"))
        self.offer_nixl = bool(extra.get("offer_nixl", False))
        self.stats_path = str(extra["stats_path"]) if extra.get("stats_path") else None
        self.reports_endpoint = str(extra["reports_endpoint"]) if extra.get("reports_endpoint") else None
        self.num_tier_slots = tier_size(extra, layout)
        self.host_tier: HostTierStore | None = None  # made with the pool
        self._report_sender: LoadReportSender | None = None  # used on the loop thread only
        self.pool = None
        self.endpoint: TransferEndpoint | None = None
        self._client: TransferClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._holds: dict[str, _WorkerHold] = {}
        # holds ended, not yet reported to the scheduler -> their number of blocks (vLLM frees them when told)
        self._released: dict[str, int] = {}
        self._loads: dict[str, _Load] = {}  # main thread
        self._tasks: dict[str, asyncio.Task] = {}  # loop thread
        self._done: deque = deque()  # (request_id, TransferResult | None, error | None, report), from the loop
        self._done_lock = threading.Lock()
        self._recv_finished: set[str] = set()
        self._recv_failed: set[str] = set()
        self._fenced: dict[str, ReadFence] = {}  # failed loads whose READs still run: finished_recving once they end
        self._load_error_blocks: set[int] = set()
        self._reports: dict[str, dict] = {}
        self._counters = dict(num_kv_blocks_received=0, num_kv_bytes_received=0, kv_transfer_ms=0.0, num_recomputes=0,
                              num_host_tier_blocks_saved=0, num_host_tier_blocks_loaded=0,
                              **{f"num_kv_pulls_{path}": 0 for path in PATHS})
        self._publisher: StatsPublisher | None = None
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
        if self.num_tier_slots:
            self.host_tier = HostTierStore(self.num_tier_slots, bytes_per_block,
                                           pinned=not isinstance(self.pool, CpuKVPool))
        self.endpoint = TransferEndpoint(self.pool, bind_host=self.bind_host, advertise_host=self.advertise_host,
                                         on_pull=self._on_pull_served, offer_nixl=self.offer_nixl)
        self.endpoint.start()
        self._client = TransferClient(transport=self.transport, connect_timeout_s=self.connect_timeout_s)
        if self.reports_endpoint:
            self._report_sender = LoadReportSender(self.reports_endpoint)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="pdserve-kv-pulls", daemon=True)
        self._loop_thread.start()
        if self.stats_path:
            # The pdserve worker reads this file instead of calling pdserve_stats: every collective_rpc makes
            # vLLM's worker process busy-poll its message queue for ~1 s afterwards (a full core, measured).
            self._publisher = StatsPublisher(self._snapshot, self.stats_path, "pdserve-kv-stats")
            self._publisher.start()
        logger.info("kv connector worker: %d blocks of %d B in %d segments, layout_tag %r, endpoint %s",
                    self.pool.num_blocks, bytes_per_block, len(self.pool.segment_nbytes), self.pool.layout_tag,
                    self.endpoint.address)

    def handshake(self) -> PdserveHandshake:
        assert self.endpoint is not None, "register_kv_caches() comes first"
        return PdserveHandshake(self.endpoint.address, self.endpoint.host_id, self.endpoint.transports)

    def shutdown(self) -> None:
        if self._publisher is not None:
            self._publisher.stop()
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
        if meta.tier_saves or meta.tier_loads:  # before this step's forward pass and pulls (connector_host_tier.py)
            assert self.host_tier is not None, "host tier copies planned, and this worker has no tier"
            self.host_tier.copy(self.pool, meta.tier_saves, meta.tier_loads)
            self._counters["num_host_tier_blocks_saved"] += len(meta.tier_saves)
            self._counters["num_host_tier_blocks_loaded"] += len(meta.tier_loads)
        for hold in meta.holds:
            # On failure pulls of the transfer are refused ("unknown") and decode recomputes.
            try:
                self.pool.stage_out(hold.block_ids)
            except Exception:
                logger.exception("request %s: could not stage its KV for transfer; freeing its blocks", hold.request_id)
                self._released[hold.request_id] = len(hold.block_ids)
                continue
            try:
                self.endpoint.allow(hold.transfer_id, hold.token, hold.block_ids, hold.expires_at)
            except Exception:
                logger.exception("request %s: could not offer its KV for transfer; freeing its blocks", hold.request_id)
                self.pool.unstage(hold.block_ids)
                self._released[hold.request_id] = len(hold.block_ids)
                continue
            self._holds[hold.request_id] = _WorkerHold(hold.transfer_id, hold.block_ids, hold.expires_at)
            logger.debug("request %s: holding %d blocks for transfer %s", hold.request_id, len(hold.block_ids),
                         hold.transfer_id)
        for rid in meta.expired:
            if self._end_hold(rid, "lease expired"):
                self._released.pop(rid, None)  # the scheduler freed these itself

    def _end_hold(self, rid: str, why: str) -> bool:
        hold = self._holds.pop(rid, None)
        if hold is None:
            return False
        self.endpoint.release(hold.transfer_id)
        self.pool.unstage(hold.block_ids)
        self._released[rid] = len(hold.block_ids)
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
            load = self._loads[spec.request_id] = _Load(spec.request_id, spec.local_block_ids,
                                                        num_tokens=spec.num_tokens)
            self._loop.call_soon_threadsafe(self._spawn_pull, spec, load.fence)
        for rid in meta.cached:
            report = dict(num_blocks=0, num_bytes=0, transfer_ms=0.0, recomputed=False, error=None, transport="")
            self._add_report(rid, report)
            self._loop.call_soon_threadsafe(self._send_report, rid, report)
        for rid in meta.cancelled:
            load = self._loads.get(rid)
            if load is not None:
                load.cancelled = True
                self._loop.call_soon_threadsafe(self._cancel_pull, rid)

    # On the loop thread. A pull counts as finished only when its task is done and its fence has ended:
    # TransferClient.pull() returns or raises (cancellation included) once nothing but the READs in its fence writes
    # into the local blocks, so vLLM may reuse them once both are true (finished_recving, transfer_results()).

    def _spawn_pull(self, spec: LoadSpec, fence: ReadFence) -> None:
        task = self._loop.create_task(self._pull(spec, fence))
        self._tasks[spec.request_id] = task
        task.add_done_callback(lambda t, rid=spec.request_id: self._on_pull_done(rid, t))

    def _cancel_pull(self, rid: str) -> None:
        task = self._tasks.get(rid)
        if task is not None:
            task.cancel()

    async def _pull(self, spec: LoadSpec, fence: ReadFence):
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
                        traceparent=spec.traceparent, peer_host_id=params.host_id, peer_transports=params.transports,
                        fence=fence)
                    break
                except TransferRefused as e:
                    waited = time.monotonic() - started
                    if (e.reason != "unknown" or waited + _UNKNOWN_RETRY_INTERVAL_S > _UNKNOWN_RETRY_S
                            or time.monotonic() + _UNKNOWN_RETRY_INTERVAL_S > deadline):
                        raise
                    await asyncio.sleep(_UNKNOWN_RETRY_INTERVAL_S)
            if not result.landed_on_device:  # else it was copied device to device, past the host staging slots
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
            report = _failure_report(error, recomputed=True, unreachable=isinstance(exc, PeerUnreachable))
        else:
            result, error = task.result(), None
            report = dict(num_blocks=result.num_blocks, num_bytes=result.num_bytes, transfer_ms=result.seconds * 1000,
                          recomputed=False, error=None, transport=result.transport)
        load = self._loads.get(rid)
        report["num_tokens"] = load.num_tokens if load is not None else 0
        if error is not None and load is not None and not load.fence.ended():
            # The engine must not wait for the request: vLLM keeps it waiting until these READs end (a frozen
            # prefill process: maybe never), so the pdserve engine aborts it and runs the prompt anew.
            report["reads_in_flight"] = load.fence.num_in_flight
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
            if report.get("reads_in_flight"):  # decided once, on the loop thread, where the report was made
                # failed_recving now (vLLM then recomputes from scratch), finished_recving once the READs end
                logger.warning("request %s: %d READs of its failed KV load still run; its %d blocks stay with vLLM's "
                               "request until they end", rid, report["reads_in_flight"], len(load.local_block_ids))
                self._fenced[rid] = load.fence
            else:
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
                self._add_report(rid, report)
            else:
                self._record_failure(rid, load.local_block_ids, error, sent=True, report=report)

    def _record_failure(self, rid: str, local_block_ids: list[int], error: str, *, sent: bool = False,
                        report: dict | None = None) -> None:
        """On vLLM's main thread; `sent`: the pull loop already pushed the report (given: recorded as pushed)."""
        logger.warning("request %s: KV load failed (%s); recomputing the prefill locally", rid, error)
        self._counters["num_recomputes"] += 1
        report = report if report is not None else _failure_report(error, recomputed=True)
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
        for rid in [r for r, fence in self._fenced.items() if fence.ended()]:
            del self._fenced[rid]
            self._recv_finished.add(rid)
            logger.info("request %s: the READs of its failed KV load ended; vLLM may reuse its blocks", rid)
        results = KVConnectorTransferResults(finished_recving=self._recv_finished, failed_recving=self._recv_failed)
        self._recv_finished, self._recv_failed = set(), set()
        if self.hold_mode == "delay_free" and self._released:
            results.finished_sending, self._released = set(self._released), {}
        return results

    def take_load_error_blocks(self) -> set[int]:
        blocks, self._load_error_blocks = self._load_error_blocks, set()
        return blocks

    def take_worker_meta(self) -> PdserveWorkerMetadata | None:
        if self.hold_mode != "refcount" or not self._released:
            return None
        meta, self._released = PdserveWorkerMetadata(set(self._released)), {}
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
            # released here, freed by vLLM at the engine's next step (an idle engine takes one when a request comes)
            "num_released_blocks": sum(self._released.values()),
            "num_held_transfers": len(holds),
            "num_transfers_refused": endpoint.get("num_transfers_refused", 0),
            "num_kv_transport_fallbacks": sum(self._client.fallbacks.values()) if self._client is not None else 0,
            "kv_transports": list(self.endpoint.transports) if self.endpoint is not None else [],
            "num_loads_in_flight": len(self._loads),
            "num_fenced_loads": len(self._fenced),
            "num_total_blocks": self.num_blocks,
        }


def _failure_report(error: str, *, recomputed: bool, unreachable: bool = False) -> dict:
    return dict(num_blocks=0, num_bytes=0, transfer_ms=0.0, recomputed=recomputed, error=error, unreachable=unreachable)



def _match_request_id(request_id: str, known: dict) -> str | None:
    """vLLM's internal id for a request is "<id given to AsyncLLM>-<8 random chars>"; accept either."""
    if request_id in known:
        return request_id
    prefix = request_id + "-"
    for rid in known:
        if rid.startswith(prefix) and len(rid) == len(prefix) + 8:
            return rid
    return None
