"""What prefill and decode workers share: NATS, the engine, heartbeats, stats, KV events (relayed to the
broker by kv.events.KVEventRelay, with a snapshot whenever a broker asks).

A worker's life: connect to NATS, find the address to advertise, start the KV event relay, build the engine
with it and start it (and with it the KV transfer endpoint on a free port), announce itself, serve, and on
shutdown say goodbye, stop the engine and drain NATS. Role-specific handlers live in services/prefill_worker
and services/decode_worker; each subscribes to cancels itself (it stops its own task, then aborts in the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pdserve import netaddr, rdma_devices, subjects
from pdserve.bus import Bus
from pdserve.config import WorkerConfig
from pdserve.engine.base import Engine, prefix_lease_id
from pdserve.engine.factory import create_engine
from pdserve.kv.events import KVEventRelay
from pdserve.kv.wire import PATHS
from pdserve.membership import HeartbeatPublisher
from pdserve.metrics import WorkerMetrics
from pdserve.peer_paths import PeerPaths
from pdserve.protocol import (MAX_RDMA_PORTS, ErrorReply, Heartbeat, KVEvent, KVRelease, KVResync, KVTransferParams,
                              StatsRequest, WorkerStats)
from pdserve.service import StartupError

log = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.worker_id = config.worker_id
        self.bus: Bus
        self.engine: Engine
        self.kv_events: KVEventRelay
        self.num_requests_served = 0
        self.num_in_flight = 0  # admitted and not yet ended (queued or running)
        self.stopping = False  # shutting down: new requests are refused
        self.started_at = time.time()
        self._stack = contextlib.AsyncExitStack()
        self._heartbeats: HeartbeatPublisher | None = None  # from __aenter__ on
        self.metrics: WorkerMetrics
        self.metrics_address: str | None = None
        self._pending: set[asyncio.Task] = set()
        self.rdma_ports: tuple[str, ...] = ()  # read at start: NICs do not come and go under a running worker
        # Prefill workers whose endpoints this worker's pulls could not connect to (heartbeats say which).
        self.peer_paths = PeerPaths(config.worker_id, probe_interval_s=config.kv_probe_interval_s,
                                    connect_timeout_s=config.kv_connect_timeout_s, on_change=self._beat_now)

    async def __aenter__(self) -> "WorkerRuntime":
        cfg = self.config
        try:
            # Where this worker listens is checked before NATS and the engine: an address it cannot bind is then
            # one line naming the flag, for both engines (vLLM's connector binds in vLLM's own process).
            try:
                advertise_host = cfg.advertise_host or netaddr.detect_advertise_host(cfg.nats_servers[0])
            except ValueError as e:
                raise StartupError(str(e)) from e
            refusal = netaddr.bind_refusal(advertise_host, cfg.bind_host, detected=not cfg.advertise_host)
            if refusal is not None:
                raise StartupError(refusal)
            self.bus = await Bus.connect_with(cfg, self.worker_id)
            self._stack.push_async_callback(self.bus.close)
            # The engine's block events go to the broker's index (the card's name is the served model name);
            # the relay outlives the engine so that the engine's last removals are sent before NATS is drained.
            self.kv_events = KVEventRelay(self.worker_id, cfg.served_model_name, self._publish_kv_event)
            await self.kv_events.start()
            self._stack.push_async_callback(self.kv_events.stop)
            await self.bus.subscribe(subjects.KV_RESYNC, KVResync, self.kv_events.on_resync)
            self.engine = create_engine(cfg, advertise_host=advertise_host, bind_host=cfg.bind_host or advertise_host,
                                        kv_events=self.kv_events)
            assert self.engine.card.name == cfg.served_model_name
            try:
                await self.engine.start()
            except netaddr.BindError as e:
                raise StartupError(str(e)) from e
            self._stack.push_async_callback(self.engine.stop)
            self.metrics = WorkerMetrics(self._metric_values, {"worker_id": self.worker_id, "role": cfg.role})
            try:
                port = self.metrics.serve(cfg.bind_host or advertise_host)
            except OSError as e:
                raise StartupError(f"the metrics server cannot listen on {cfg.bind_host or advertise_host} "
                                   f"({e.strerror or e}); pass --bind-host with an address of this host "
                                   "(0.0.0.0: all of them)") from e
            self._stack.callback(self.metrics.stop)
            self.metrics_address = f"{netaddr.http_url(advertise_host, port)}/metrics"
            await self.bus.serve(subjects.worker_stats(self.worker_id), StatsRequest, self._on_stats)
            rdma = rdma_devices.scan()
            self.rdma_ports = tuple(p.short() for p in rdma.ports)[:MAX_RDMA_PORTS]
            log.info("worker %s: %s", self.worker_id, rdma_devices.summary(rdma.ports, rdma.source))
            if rdma.note is not None:
                log.warning("worker %s: RDMA port(s) in %s, but %s", self.worker_id, rdma_devices.SYSFS_ROOT, rdma.note)
            self._heartbeats = HeartbeatPublisher(self.bus, self.heartbeat, cfg.heartbeat_interval_s)
            log.info("%s worker %s: model %s, engine %s, KV transfer endpoint %s, metrics %s", cfg.role,
                     self.worker_id, self.engine.card.name, cfg.engine, self.engine.transfer_address,
                     self.metrics_address)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def announce(self) -> None:
        """Start heartbeats once the role's handlers are subscribed (not before: the router would send work)."""
        assert self._heartbeats is not None
        await self._heartbeats.start()
        self._stack.push_async_callback(self._heartbeats.stop)
        self._stack.push_async_callback(self.peer_paths.stop)

    async def _beat_now(self) -> None:
        """A heartbeat out of turn: what routers must know now (a path found dead or working again)."""
        if self._heartbeats is not None:
            await self._heartbeats.beat()

    async def __aexit__(self, *exc: object) -> None:
        log.info("worker %s stopping", self.worker_id)
        # From now on new requests are refused (retryable): one a router sent before it heard the goodbye goes
        # elsewhere at once, instead of being taken by a worker whose engine is about to stop.
        self.stopping = True
        await self._stack.aclose()

    def release_prefix_lease(self, request_id: str, lease: KVTransferParams) -> None:
        """Tell the peer that leased the prompt's leading blocks (a prefix lease for request_id) that they were
        pulled or given up: it unpins them now, not at lease end."""
        release = KVRelease(request_id=prefix_lease_id(request_id), transfer_id=lease.transfer_id, ok=True)
        self.spawn(self.bus.publish(subjects.kv_release(lease.worker_id), release, request_id=request_id))

    def spawn(self, coro) -> asyncio.Task:
        """Fire-and-forget work (publishes from sync callbacks) with a kept reference."""
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def _metric_values(self) -> dict:
        """The engine's counters plus this worker's own: what heartbeats and /metrics both report."""
        stats = self.engine.stats()
        return {**stats, "num_requests_served": self.num_requests_served,
                "num_queued": max(0, self.num_in_flight - int(stats["num_running"]))}

    def heartbeat(self) -> Heartbeat:
        values = self._metric_values()
        return Heartbeat(
            worker_id=self.worker_id, role=self.config.role, model=self.engine.card,
            transfer_address=self.engine.transfer_address, metrics_address=self.metrics_address,
            num_queued=values["num_queued"], num_running=int(values["num_running"]),
            kv_usage=values["kv_usage"], num_held_blocks=int(values["num_held_blocks"]),
            num_requests_served=values["num_requests_served"], kv_event_seq=self.kv_events.sent_seq,
            kv_transports=tuple(values.get("kv_transports", ())),
            reuses_peer_prefixes=self.engine.reuses_peer_prefixes,
            num_kv_pulls={path: int(values.get(f"num_kv_pulls_{path}", 0)) for path in PATHS},
            unreachable_peer_ids=self.peer_paths.unreachable_ids, num_reconnects=self.bus.num_reconnects,
            rdma_ports=self.rdma_ports,
            interval_s=self.config.heartbeat_interval_s,
            sent_at=time.time(), started_at=self.started_at,
        )

    def refusal(self, model: str, deadline: float) -> ErrorReply | None:
        """Why a new request cannot be taken here (stopping, wrong model, too late, full), or None to take it."""
        if self.stopping:
            return ErrorReply(code="stopping", message=f"{self.worker_id} is stopping; try another worker",
                              retryable=True)
        if model != self.engine.card.name:
            return ErrorReply(code="wrong_model", message=f"{self.worker_id} serves {self.engine.card.name}, not {model}")
        if time.time() >= deadline:
            return ErrorReply(code="deadline_passed", message="the request's deadline passed before it reached "
                              f"{self.worker_id}", retryable=False)
        if self.num_in_flight >= self.config.max_queue:
            return ErrorReply(code="overloaded", message=f"{self.worker_id} has {self.num_in_flight} requests "
                              f"(max {self.config.max_queue}, --max-queue)")
        return None

    async def _on_stats(self, _: StatsRequest) -> WorkerStats:
        await self.engine.refresh_stats()
        stats = {k: v for k, v in self._metric_values().items() if k in WorkerStats.model_fields}
        return WorkerStats(worker_id=self.worker_id, role=self.config.role, **stats)

    async def _publish_kv_event(self, event: KVEvent) -> None:
        await self.bus.publish(subjects.kv_events(self.worker_id), event)
