"""KV broker: the global view of cached KV blocks and the book of KV handovers.

Life: config -> tracing -> NATS -> follow worker membership (a worker that leaves drops out of the index) ->
record KV stored/removed events, KV held for decode and transfer completions -> ask every worker for a snapshot
of its blocks (KVResync: a restarted broker rebuilds its index from the workers themselves, the only ones that
know what they hold) -> answer lookups (queue group, so several brokers can share the load; one span each) ->
heartbeat as role "broker" -> SIGTERM -> goodbye, drain -> flush spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pdserve import subjects, tracing
from pdserve.bus import Bus
from pdserve.config import BrokerConfig
from pdserve.membership import HeartbeatPublisher, Membership, subscribe_membership
from pdserve.protocol import Goodbye, Heartbeat, KVEvent, KVLookup, KVHeld, KVLookupReply, KVResync, KVTransferDone
from pdserve.service import shutdown_event
from pdserve.tracing import SpanKind, setup_tracing, shutdown_tracing
from services.kv_broker.index import BlockIndex
from services.kv_broker.sync import EventSequences

log = logging.getLogger(__name__)

# A worker whose KV events arrive but whose heartbeats never do (it died before this broker heard one) is
# dropped from the index this long after its last event; a member is dropped by membership instead.
UNANNOUNCED_GRACE_S = 10.0


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.index = BlockIndex()
        self.sequences = EventSequences()
        self.membership = Membership()
        self.membership.on_gone.append(self.on_worker_gone)
        self.membership.on_join.append(self.on_worker_join)
        self.started_at = time.time()
        self.num_kv_held = 0
        self.num_transfers_ok = 0
        self.num_transfers_failed = 0
        self.num_bytes_transferred = 0
        self.num_resyncs_asked = 0
        self._departed: set[str] = set()  # gone workers: their late events are not believed until they beat again
        self._last_event_at: dict[str, float] = {}  # worker_id -> monotonic time of its last KV event
        self._bus: Bus | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, bus: Bus) -> None:
        """Follow membership and KV events, serve lookups, then ask every worker for a snapshot."""
        self._bus = bus
        await self.membership.start(bus)
        await subscribe_membership(bus, self.on_heartbeat, self.on_goodbye)
        await bus.subscribe(subjects.KV_EVENTS_ALL, KVEvent, self.on_kv_event,
                            subject_of=lambda event: subjects.kv_events(event.worker_id))
        await bus.subscribe(subjects.KV_HELD, KVHeld, self.on_kv_held)
        await bus.subscribe(subjects.KV_TRANSFER_DONE, KVTransferDone, self.on_transfer_done)
        await bus.serve(subjects.KV_LOOKUP, KVLookup, self.on_lookup, queue=subjects.BROKER_QUEUE)
        await self.ask_snapshot(None)
        self._sweeper = asyncio.create_task(self._sweep_every(1.0), name="kv-index-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.membership.stop()

    async def _sweep_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.sweep()

    def sweep(self) -> None:
        """Drop indexed workers that never announced themselves and went quiet (see UNANNOUNCED_GRACE_S)."""
        now = time.monotonic()
        for worker_id in self.index.workers():
            if (self.membership.get(worker_id) is None
                    and now - self._last_event_at.get(worker_id, now) > UNANNOUNCED_GRACE_S):
                log.warning("worker %s sent KV events but no heartbeat for %.0fs; dropping it from the index",
                            worker_id, now - self._last_event_at[worker_id])
                self.on_worker_gone(worker_id)

    async def ask_snapshot(self, worker_id: str | None) -> None:
        """KVResync to one worker (None: all): it answers with a cleared event and its blocks."""
        if self._bus is None:
            return
        self.num_resyncs_asked += 1
        log.info("asking %s for a snapshot of its KV blocks", worker_id or "every worker")
        try:
            await self._bus.publish(subjects.KV_RESYNC, KVResync(broker_id=self.config.broker_id, worker_id=worker_id))
        except Exception as e:  # NATS down: the next heartbeat check asks again
            log.warning("KV resync request not sent: %s", e)

    def on_worker_gone(self, worker_id: str) -> None:
        self.index.drop_worker(worker_id)
        self.sequences.forget(worker_id)
        self._last_event_at.pop(worker_id, None)
        self._departed.add(worker_id)

    async def on_goodbye(self, bye: Goodbye) -> None:
        # Membership only reports members it knew; a worker that left before this broker heard its first
        # heartbeat (a broker restarted a moment earlier) may still be in the index from its snapshot.
        if bye.role != "broker":
            self.on_worker_gone(bye.worker_id)

    def on_worker_join(self, hb: Heartbeat) -> None:
        self._departed.discard(hb.worker_id)

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        if hb.role != "broker" and self.sequences.on_heartbeat(hb):
            log.warning("worker %s published KV events up to %d, this broker applied %d; asking for a snapshot",
                        hb.worker_id, hb.kv_event_seq, self.sequences.applied(hb.worker_id))
            await self.ask_snapshot(hb.worker_id)

    async def on_kv_event(self, event: KVEvent) -> None:
        if event.worker_id in self._departed:
            log.debug("KV event %d of departed worker %s ignored", event.seq, event.worker_id)
            return
        self._last_event_at[event.worker_id] = time.monotonic()
        if event.cleared:
            self.index.drop_worker(event.worker_id)
        self.index.store(event.worker_id, event.model, event.stored, event.parent_hash)
        self.index.remove(event.worker_id, event.model, event.removed)
        if event.to_host or event.to_device:
            self.index.set_tier(event.worker_id, event.to_host, event.to_device)
        if self.sequences.on_event(event):
            log.warning("KV events of worker %s: got %d after a gap; asking for a snapshot", event.worker_id, event.seq)
            await self.ask_snapshot(event.worker_id)

    async def on_kv_held(self, held: KVHeld) -> None:
        self.num_kv_held += 1

    async def on_transfer_done(self, done: KVTransferDone) -> None:
        if done.ok:
            self.num_transfers_ok += 1
            self.num_bytes_transferred += done.num_bytes
        else:
            self.num_transfers_failed += 1
            log.warning("request %s: KV handover %s -> %s failed: %s", done.request_id, done.prefill_worker_id,
                        done.decode_worker_id, done.error)

    async def on_lookup(self, req: KVLookup) -> KVLookupReply:
        with tracing.span("kv lookup", kind=SpanKind.SERVER,
                          attributes={"worker_id": self.config.broker_id, "model": req.model,
                                      "num_block_hashes": len(req.block_hashes)}) as span:
            self.membership.prune()
            num_matched = self.index.lookup(req.model, req.block_hashes)
            num_host = self.index.num_host_blocks(num_matched, req.block_hashes)
            span.set_attributes({"num_workers_matched": sum(1 for n in num_matched.values() if n),
                                 "max_num_matched_blocks": max(num_matched.values(), default=0),
                                 "max_num_matched_host_blocks": max(num_host.values(), default=0)})
            return KVLookupReply(num_matched_blocks=num_matched, num_matched_host_blocks=num_host,
                                 broker_id=self.config.broker_id)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(worker_id=self.config.broker_id, role="broker", num_requests_served=self.num_kv_held,
                         interval_s=self.config.heartbeat_interval_s, sent_at=time.time(), started_at=self.started_at)


async def serve(config: BrokerConfig) -> None:
    setup_tracing("kv-broker")
    try:
        await _serve(config)
    finally:
        shutdown_tracing()


async def _serve(config: BrokerConfig) -> None:
    stop = shutdown_event()
    broker = Broker(config)
    bus = await Bus.connect_with(config, config.broker_id)
    heartbeats = HeartbeatPublisher(bus, broker.heartbeat, config.heartbeat_interval_s)
    try:
        await broker.start(bus)
        await heartbeats.start()
        log.info("KV broker %s ready", config.broker_id)
        await stop.wait()
    finally:
        await heartbeats.stop()
        await broker.stop()
        await bus.close()
