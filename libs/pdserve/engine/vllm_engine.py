"""The vLLM engine: vLLM V1's AsyncLLM in the worker process, KV moved by pdserve's own connector.

The KV cache lives in vLLM's EngineCore process (a child of the worker); so do our connector and its
transfer endpoint (pdserve.kv.vllm_connector). The worker talks to them through vLLM's collective_rpc and
our worker extension (pdserve.kv.vllm_worker_ext): the endpoint's address, releases, counters. Load reports
come the other way, pushed by the connector the moment a pull ends (pdserve.kv.vllm_reports), so that no
token waits for vLLM's engine loop to answer a call.

Prefill runs the prompt with max_tokens=1 and kv_transfer_params {"do_remote_decode": True}: the connector
holds the blocks under a lease and returns where they are (with a peer's lease of the prompt's leading blocks, it
loads them first: vllm_prefix.py). Decode runs prompt + the first token with
{"do_remote_prefill": True, "pdserve": <KVTransferParams>}: the connector pulls the prompt's KV into freshly
allocated blocks before the request is scheduled, or lets vLLM recompute it if the pull fails.

With prefix_caching, vLLM keeps finished prompts' blocks in its prefix cache and publishes its KV cache events
on an ipc:// ZMQ socket of this worker; kv.vllm_events relays them to `kv_events` under pdserve's hashes.

A request vLLM's KV cache cannot take now is refused with EngineFull (see _check_room), as the mock refuses it,
so that the router tries another worker instead of the request waiting in vLLM's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from opentelemetry.trace import Span, SpanKind

from pdserve import tracecontext, tracing
from pdserve.engine.base import Engine, EngineFull, KVLoadReport, PrefillResult, TokenOutput
from pdserve.engine.vllm_io import finish_reason, tokens_prompt, vllm_request, with_report
from pdserve.engine.vllm_prefix import VllmPeerPrefixes
from pdserve.kv.client import DEFAULT_CONNECT_TIMEOUT_S
from pdserve.kv.events import KVEventSink
from pdserve.kv.host_tier import GIB, num_tier_blocks
from pdserve.kv.vllm_reports import LoadReports, report_endpoint
from pdserve.protocol import FinishReason, KVTransferParams, ModelCard, SamplingParams

log = logging.getLogger(__name__)

CONNECTOR_NAME = "PdserveConnector"
CONNECTOR_MODULE = "pdserve.kv.vllm_connector"
WORKER_EXTENSION = "pdserve.kv.vllm_worker_ext.PdserveWorkerExtension"
_STATS_REFRESH_S = 0.5
# A pushed load report normally arrives before vLLM's first output of the request; past the pull's own deadline
# plus this, the report is taken as lost (logged) and the prefill's lease ends the hold.
_REPORT_GRACE_S = 5.0


@dataclass(frozen=True, kw_only=True)
class VllmEngineConfig:
    """What a vLLM engine is made of; engine.factory builds it from WorkerConfig. The card (factory.vllm_card)
    holds the served name, max_model_len, and the KV's dtype and block size vLLM is started with."""

    worker_id: str
    model_path: Path
    card: ModelCard
    advertise_host: str
    bind_host: str
    kv_lease_s: float
    kv_pull_timeout_s: float
    kv_connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    kv_transport: str = "auto"
    offer_nixl: bool = False  # factory.offers_nixl
    kv_cache_gib: int = 1
    cpu_cores: str | None = None
    enforce_eager: bool = True
    prefix_caching: bool = True
    num_kv_blocks: int | None = None  # vLLM's num_gpu_blocks_override (None: as many as kv_cache_gib holds)
    host_cache_gib: float = 0.0  # the host-memory KV tier in the connector (kv.connector_host_tier; 0: none)


class VllmEngine(VllmPeerPrefixes, Engine):
    def __init__(self, config: VllmEngineConfig, *, kv_events: KVEventSink | None = None):
        self.config = config
        self.worker_id = worker_id = config.worker_id
        self.card = config.card
        self.kv_events = kv_events
        self._block_size = config.card.kv_layout.block_size
        self._kv_events_path = os.path.join(tempfile.gettempdir(), f"pdserve-{worker_id}-kv-events.sock")
        self._kv_event_subscriber: Any = None
        # The connector publishes its counters here: reading a file costs vLLM nothing, while every
        # collective_rpc makes vLLM's worker busy-poll for about a second.
        self._stats_path = os.path.join(tempfile.gettempdir(), f"pdserve-{worker_id}-kv-stats.json")
        self._load_reports = LoadReports(report_endpoint(worker_id))
        self._report_tasks: set[asyncio.Task] = set()
        self._llm: Any = None
        self._address: str | None = None
        self._stats: dict[str, float] = {}
        self._running: set[str] = set()
        self._num_local_prefills = 0
        self._num_cached_tokens = 0  # prompt tokens vLLM's prefix cache served (prefills and local prefills)
        self._prefix_counters = {"num_prefix_peer_loaded_tokens": 0, "num_prefix_peer_loaded_bytes": 0,
                                 "num_prefix_peer_load_failures": 0, "num_computed_prompt_tokens": 0}
        self._refresher: asyncio.Task | None = None

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg, card = self.config, self.card
        # vLLM reads these when it starts its EngineCore process: pin OMP threads to our cores, size the KV cache.
        if cfg.cpu_cores:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_cores
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(cfg.model_path), served_model_name=card.name, dtype=card.kv_layout.dtype,
            max_model_len=card.max_model_len, block_size=self._block_size,
            enable_prefix_caching=cfg.prefix_caching, kv_events_config=self._kv_events_config(),
            seed=0, disable_log_stats=True, worker_extension_cls=WORKER_EXTENSION,
            enforce_eager=cfg.enforce_eager, num_gpu_blocks_override=cfg.num_kv_blocks,
            kv_transfer_config=KVTransferConfig(
                kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={
                    "worker_id": self.worker_id, "model_name": card.name,
                    "advertise_host": cfg.advertise_host, "bind_host": cfg.bind_host,
                    "lease_s": cfg.kv_lease_s, "pull_timeout_s": cfg.kv_pull_timeout_s,
                    "connect_timeout_s": cfg.kv_connect_timeout_s,
                    "transport": cfg.kv_transport, "offer_nixl": cfg.offer_nixl,
                    "stats_path": self._stats_path,
                    "reports_endpoint": self._load_reports.endpoint,
                    "host_cache_gib": cfg.host_cache_gib,
                },
            ),
        )
        log.info("starting vLLM on %s (%s, max_model_len %d, cores %s)", cfg.model_path, card.kv_layout.dtype,
                 card.max_model_len, cfg.cpu_cores or "auto")
        self._load_reports.start()  # before vLLM starts: its connector connects as it comes up
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except BaseException:
            await self._load_reports.stop()
            if self._kv_event_subscriber is not None:
                await self._kv_event_subscriber.stop()
            raise
        self._address = await self._rpc("pdserve_transfer_address")
        num_tier_slots = num_tier_blocks(cfg.host_cache_gib, card.kv_layout.bytes_per_block)
        if num_tier_slots:
            log.info("worker %s: host-memory KV tier of %d blocks (%.2f GiB), empty at start", self.worker_id,
                     num_tier_slots, num_tier_slots * card.kv_layout.bytes_per_block / GIB)
        await self.refresh_stats()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="vllm-stats")

    def _kv_events_config(self) -> Any:
        """vLLM publishes its KV cache events on our own ipc socket, read by a subscriber started first."""
        if not self.config.prefix_caching or self.kv_events is None:
            return None
        from vllm.config.kv_events import KVEventsConfig

        from pdserve.kv.vllm_events import TOPIC, VllmKVEventMapper, VllmKVEventSubscriber

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._kv_events_path)  # a socket left by an earlier worker of this id
        endpoint = f"ipc://{self._kv_events_path}"
        self._kv_event_subscriber = VllmKVEventSubscriber(endpoint, VllmKVEventMapper(self.kv_events, self._block_size))
        self._kv_event_subscriber.start()
        return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic=TOPIC)

    async def stop(self) -> None:
        if self._kv_event_subscriber is not None:
            await self._kv_event_subscriber.stop()
            self._kv_event_subscriber = None
        if self._refresher:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for task in list(self._report_tasks):
            task.cancel()
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        await self._load_reports.stop()
        from pdserve.kv.connector_stats import pool_stats_path

        for path in (self._stats_path, pool_stats_path(self._stats_path), self._kv_events_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @property
    def transfer_address(self) -> str | None:
        return self._address

    # ------------------------------------------------------------------------------------ prefill

    async def prefill(self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams,
                      lease_s: float, prefix_kv: KVTransferParams | None = None) -> PrefillResult:
        self._check_room(request_id, len(prompt_token_ids))
        kv: dict = {"do_remote_decode": True}
        report_task = None
        if prefix_kv is not None and self.reuses_peer_prefixes:  # vllm_prefix.py: the peer's blocks, not computed
            kv, report_task = self._prefix_load(request_id, prefix_kv)
        params = vllm_request(sampling, max_tokens=1, kv_transfer_params=kv)
        final = None
        self._running.add(request_id)
        try:
            async for output in self._llm.generate(tokens_prompt(prompt_token_ids), params, request_id):
                final = output
        except BaseException:
            if report_task is not None:
                report_task.cancel()
            raise
        finally:
            self._running.discard(request_id)
        assert final is not None and final.outputs, f"request {request_id}: vLLM returned no output"
        # vLLM's count: its own cache's hit and the tokens the connector was to load, whether or not it did
        num_cached_tokens = final.num_cached_tokens or 0
        num_peer_tokens, peer_load = 0, None
        if report_task is not None:
            num_peer_tokens, num_unloaded, peer_load = await self._prefix_loaded(request_id, report_task, prefix_kv,
                                                                                 num_cached_tokens)
            num_cached_tokens -= num_peer_tokens + num_unloaded
        num_computed = len(prompt_token_ids) - num_cached_tokens - num_peer_tokens
        self._prefix_counters["num_computed_prompt_tokens"] += num_computed
        completion = final.outputs[0]
        finish: FinishReason | None = None
        if completion.finish_reason == "stop":  # EOS or a stop string as the very first token
            finish = "stop"
        elif sampling.max_tokens == 1:
            finish = "length"
        kv = (final.kv_transfer_params or {}).get("pdserve")
        transfer = KVTransferParams.model_validate(kv) if kv else None
        if finish is not None and transfer is not None:
            await self.release_kv(request_id)  # nobody will pull it
            transfer = None
        self._num_cached_tokens += num_cached_tokens
        return PrefillResult(completion.token_ids[0], completion.text, finish, transfer,
                             num_cached_tokens=num_cached_tokens, num_peer_loaded_tokens=num_peer_tokens,
                             num_peer_loaded_bytes=peer_load.num_bytes if num_peer_tokens else 0,
                             peer_load_ms=peer_load.transfer_ms if num_peer_tokens else 0.0)

    async def release_kv(self, request_id: str) -> bool:
        """Free the blocks held for request_id; the pulls the connector served for it become "kv serve"
        spans here (the endpoint runs in vLLM's process, which exports no spans), children of the pullers'
        "kv pull" spans through the traceparent each pull carried."""
        report = await self._rpc("pdserve_release_and_report", request_id)
        if tracing.enabled():
            for pull in report["served"]:
                attributes = {"request_id": request_id, "worker_id": self.worker_id,
                              "kv_transport": pull.get("transport", "tcp"),
                              **tracing.transfer_attributes(pull["num_blocks"], pull["num_bytes"], pull["seconds"])}
                tracing.record_span("kv serve", kind=SpanKind.SERVER, seconds=pull["seconds"],
                                    end_ns=pull["ended_at_ns"], context=tracecontext.context_of(pull["traceparent"]),
                                    attributes=attributes)
        return bool(report["released"])

    # ------------------------------------------------------------------------------------- decode

    async def generate(self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams,
                       first_token_id: int | None, kv_transfer_params: KVTransferParams | None,
                       resume_token_ids: tuple[int, ...] = (),
                       prefix_kv: KVTransferParams | None = None) -> AsyncIterator[TokenOutput | KVLoadReport]:
        pulls = False
        if resume_token_ids:
            # Prompt + what was streamed is a prompt like any other: vLLM prefills it and goes on from there.
            prompt, max_tokens = (*prompt_token_ids, *resume_token_ids), sampling.max_tokens - len(resume_token_ids)
            if max_tokens <= 0:
                yield TokenOutput((), "", "length")
                return
        elif kv_transfer_params is not None and first_token_id is not None:
            # Continue after the first token: its own KV is computed here, the prompt's is pulled.
            prompt, max_tokens, pulls = (*prompt_token_ids, first_token_id), sampling.max_tokens - 1, True
        else:
            prompt, max_tokens = prompt_token_ids, sampling.max_tokens
        self._check_room(request_id, len(prompt))
        kv = report_task = None
        if pulls:
            assert kv_transfer_params is not None
            # The "kv pull" span runs from here to the connector's report (vLLM schedules the load, then the pull
            # runs); its traceparent rides in the pull, so the endpoint's "kv serve" span is its child.
            pull_span = tracing.tracer().start_span("kv pull", kind=SpanKind.CLIENT, attributes={
                "request_id": request_id, "worker_id": self.worker_id, "prefill_worker_id": kv_transfer_params.worker_id,
                "transfer_id": kv_transfer_params.transfer_id})
            kv = {"do_remote_prefill": True, "pdserve": kv_transfer_params.model_dump(mode="json"),
                  "traceparent": tracecontext.of_span(pull_span)}
            report_task = self._spawn_report(request_id, pull_span, self._load_reports.expect(request_id))
        else:
            self._num_local_prefills += 1
        prefix_task = None  # a local prefill that loads a peer's lease of its leading blocks (vllm_prefix.py)
        if prefix_kv is not None and not pulls and not resume_token_ids and self.reuses_peer_prefixes:
            kv, prefix_task = self._prefix_load(request_id, prefix_kv, hold_after=False)
        params = vllm_request(sampling, max_tokens=max_tokens, kv_transfer_params=kv)
        finished = counted = False
        num_unloaded = 0  # prompt tokens a failed pull was to bring: vLLM computed them
        self._running.add(request_id)
        outputs = with_report(self._llm.generate(tokens_prompt(prompt), params, request_id), report_task)
        try:
            while outputs is not None:
                stuck = None  # a failed load whose READs still run: the request is run anew
                async with contextlib.aclosing(outputs):
                    async for output in outputs:
                        if isinstance(output, KVLoadReport):
                            num_unloaded = output.num_tokens if output.recomputed else 0
                            yield output
                            if output.reads_in_flight:
                                # the new request loads nothing: vLLM counts none of its tokens as cached
                                stuck, num_unloaded = output, 0
                                break
                            continue
                        if not counted:  # what vLLM computed of the prompt (after a pull: its first token's KV)
                            num_cached, num_peer = output.num_cached_tokens or 0, 0
                            if prefix_task is not None:
                                num_peer, num_unloaded, _ = await self._prefix_loaded(request_id, prefix_task,
                                                                                      prefix_kv, num_cached)
                            num_cached -= num_peer + num_unloaded
                            self._prefix_counters["num_computed_prompt_tokens"] += len(prompt) - num_cached - num_peer
                            if not pulls:  # a local prefill: what its prefix cache served
                                self._num_cached_tokens += num_cached
                        counted = True
                        completion = output.outputs[0]
                        finish = finish_reason(completion.finish_reason) if output.finished else None
                        finished = output.finished
                        yield TokenOutput(tuple(completion.token_ids), completion.text, finish)
                # after the old outputs closed: closing them aborts vLLM's request of that id
                outputs = await self._run_anew(request_id, prompt, sampling, max_tokens, stuck) if stuck else None
        finally:
            self._running.discard(request_id)
            if report_task is not None and not finished:  # ended before or while its KV loaded (cancelled, failed)
                report_task.cancel()
            if prefix_task is not None and not prefix_task.done():
                prefix_task.cancel()
            if not finished and self._llm is not None:
                await self._llm.abort(request_id)

    async def _run_anew(self, request_id: str, prompt: tuple[int, ...], sampling: SamplingParams, max_tokens: int,
                        report: KVLoadReport) -> Any:
        """A failed pull left READs running into the request's blocks (a frozen prefill process): vLLM keeps that
        request waiting for its KV until they end, maybe never. It is aborted (vLLM still keeps its blocks until the
        connector says the READs ended) and the prompt runs anew as a local prefill; its outputs."""
        log.warning("request %s: %d READs of its failed KV load still run; prefilling it anew here instead of "
                    "waiting for them", request_id, report.reads_in_flight)
        await self._llm.abort(request_id)
        self._num_local_prefills += 1
        params = vllm_request(sampling, max_tokens=max_tokens, kv_transfer_params=None)
        return self._llm.generate(tokens_prompt(prompt), params, request_id)

    def _check_room(self, request_id: str, num_tokens: int) -> None:
        """Raise EngineFull when vLLM's KV cache cannot take a request of num_tokens now (blocks needed > free).

        The signal: num_free_blocks of vLLM's own block pool (free blocks plus the prefix cache's evictable ones,
        as vLLM's scheduler counts them; blocks held for transfers and running requests are not free), which the
        connector's scheduler side publishes every 0.5 s when it changed (PoolUsagePublisher) and
        _refresh_forever reads every 0.5 s: up to about 1 s stale, so requests admitted within that time are
        not in it yet (vLLM queues what overshoots, as it did before this check). Before the pool was first
        published the figure counts only held blocks (an overestimate of what is free); before any stats were
        read nothing is refused. Needed: the whole prompt's blocks (on the safe side: vLLM would share prefix
        blocks in use by running requests), not those of tokens yet to generate (vLLM allocates them as it goes)."""
        if not self._stats.get("num_total_blocks"):
            return
        num_free = int(self._stats.get("num_free_blocks", 0))
        num_needed = -(-num_tokens // self._block_size)
        if num_needed > num_free:
            raise EngineFull(f"request {request_id}: {num_needed} KV blocks needed, {num_free} free in vLLM's KV cache")

    def _spawn_report(self, request_id: str, pull_span: Span, future: asyncio.Future) -> asyncio.Task:
        """Await the load's report, which the connector pushes, beside the token stream (created in the
        request's context, so the decode span is current)."""
        task = asyncio.create_task(self._load_report(request_id, pull_span, future), name=f"kv-report-{request_id}")
        self._report_tasks.add(task)
        task.add_done_callback(self._report_tasks.discard)
        task.add_done_callback(lambda t: self._report_task_ended(t, request_id, pull_span))
        return task

    def _report_task_ended(self, task: asyncio.Task, request_id: str, pull_span: Span) -> None:
        """A report task cancelled before its first step never ran its own clean-up: stop awaiting the report,
        end the span."""
        if task.cancelled():
            self._load_reports.forget(request_id)
            if pull_span.is_recording():
                pull_span.set_attribute("cancelled", True)
                pull_span.end()

    async def _load_report(self, request_id: str, pull_span: Span, future: asyncio.Future) -> KVLoadReport | None:
        """The connector's report of the load, with the "kv pull" span ended on it; None if it never came."""
        timeout_s = self.config.kv_pull_timeout_s + _REPORT_GRACE_S
        try:
            report = await self._load_reports.wait(request_id, future, timeout_s)
        except asyncio.CancelledError:
            pull_span.set_attribute("cancelled", True)
            pull_span.end()
            raise
        if report is None:
            tracing.record_error(pull_span, "the connector sent no load report")
        elif report["recomputed"]:
            tracing.record_error(pull_span, f"KV load failed, recomputed: {report.get('error')}")
            pull_span.set_attribute("kv_recomputed", True)
        else:
            pull_span.set_attributes(tracing.transfer_attributes(
                report["num_blocks"], report["num_bytes"], report["transfer_ms"] / 1000))
            pull_span.set_attribute("kv_transport", report.get("transport", "tcp"))
        pull_span.end()
        if report is None:
            log.warning("request %s: no KV load report from the connector within %.0f s; the prefill worker's "
                        "lease frees its blocks", request_id, timeout_s)
            return None
        return KVLoadReport(num_blocks=report["num_blocks"], num_bytes=report["num_bytes"],
                            transfer_ms=report["transfer_ms"], recomputed=report["recomputed"],
                            error=report.get("error"), transport=report.get("transport") or "",
                            unreachable=bool(report.get("unreachable")), num_tokens=int(report.get("num_tokens") or 0),
                            reads_in_flight=int(report.get("reads_in_flight") or 0))

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            await self._llm.abort(request_id)
        await self.release_kv(request_id)  # blocks held for a puller, if any

    # ------------------------------------------------------------------------------------- counters

    async def refresh_stats(self) -> None:
        """Exact counters now (an RPC: for explicit stats requests, not for timers)."""
        self._set_stats(await self._rpc("pdserve_stats"))

    async def _refresh_forever(self) -> None:
        from pdserve.kv.connector_stats import read_published_stats

        while True:
            await asyncio.sleep(_STATS_REFRESH_S)
            published = read_published_stats(self._stats_path)
            if published is not None:
                self._set_stats(published)

    def _set_stats(self, stats: dict) -> None:
        """The connector's worker-side counters (num_held_blocks: blocks held for KV transfers) plus the block
        pool's usage the scheduler side publishes (kv_usage, num_free_blocks: running requests included; the host
        tier's blocks and the prompt tokens copied back from it).
        Until the pool was published once, usage is estimated from the held blocks alone."""
        from pdserve.kv.connector_stats import pool_stats_path, read_published_stats

        total = stats.get("num_total_blocks") or 0
        held = stats.get("num_held_blocks", 0)
        usage = {"kv_usage": held / total if total else 0.0, "num_free_blocks": max(0, total - held)}
        pool = read_published_stats(pool_stats_path(self._stats_path))
        if pool is not None:
            # Blocks of holds the connector's worker half released: vLLM gets them back at the engine's next step,
            # which an idle engine takes only when a request comes; free for that request. (Counted per hold: holds
            # sharing blocks count them more than once, hence the cap; vLLM queues what overshoots.)
            num_free, kv_usage = int(pool["num_free_blocks"]), float(pool["kv_usage"])
            released = int(stats.get("num_released_blocks", 0))
            if released and total > 1:
                usable = total - 1  # vLLM's null block is neither free nor usable
                released = min(released, usable - num_free)
                num_free, kv_usage = num_free + released, max(0.0, kv_usage - released / usable)
            usage = {"kv_usage": kv_usage, "num_free_blocks": num_free}
            for name in ("num_host_tier_blocks", "num_prefix_host_loaded_tokens"):  # the host tier's, if any
                if name in pool:
                    usage[name] = int(pool[name])
        self._stats = {**stats, "num_local_prefills": self._num_local_prefills, **usage}

    def stats(self) -> dict[str, float]:
        return {**self._stats, **self._prefix_counters, "num_cached_tokens": self._num_cached_tokens,
                "num_running": len(self._running)}

    # ------------------------------------------------------------------------------------- helpers

    async def _rpc(self, method: str, *args: Any) -> Any:
        return (await self._llm.collective_rpc(method, args=args))[0]
