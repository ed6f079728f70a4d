"""KV broker: the global view of cached KV blocks and the book of KV handovers.

Life: config -> tracing -> NATS -> follow worker membership (a worker that leaves drops out of the index) ->
record KV stored/removed events, KV-ready events and transfer completions -> answer lookups (queue group, so
several brokers can share the load; one span each) -> heartbeat as role "broker" -> SIGTERM -> goodbye, drain ->
flush spans.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve import subjects, tracing
from pdserve.bus import Bus
from pdserve.config import BrokerConfig
from pdserve.membership import HeartbeatPublisher, Membership
from pdserve.protocol import Heartbeat, KVEvent, KVLookup, KVLookupReply, KVReady, KVTransferDone
from pdserve.service import shutdown_event
from pdserve.tracing import SpanKind, setup_tracing, shutdown_tracing
from services.kv_broker.index import BlockIndex

log = logging.getLogger(__name__)


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.index = BlockIndex()
        self.membership = Membership()
        self.membership.on_gone.append(self.index.drop_worker)
        self.started_at = time.time()
        self.num_kv_ready = 0
        self.num_transfers_ok = 0
        self.num_transfers_failed = 0
        self.num_bytes_transferred = 0

    async def on_kv_event(self, event: KVEvent) -> None:
        if event.cleared:
            self.index.drop_worker(event.worker_id)
        self.index.store(event.worker_id, event.model, event.stored)
        self.index.remove(event.worker_id, event.model, event.removed)

    async def on_kv_ready(self, ready: KVReady) -> None:
        self.num_kv_ready += 1

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
            span.set_attributes({"num_workers_matched": sum(1 for n in num_matched.values() if n),
                                 "max_num_matched_blocks": max(num_matched.values(), default=0)})
            return KVLookupReply(num_matched_blocks=num_matched)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(worker_id=self.config.broker_id, role="broker", num_requests_served=self.num_kv_ready,
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
        await broker.membership.start(bus)
        await bus.subscribe(subjects.KV_EVENTS_ALL, KVEvent, broker.on_kv_event)
        await bus.subscribe(subjects.KV_READY, KVReady, broker.on_kv_ready)
        await bus.subscribe(subjects.KV_TRANSFER_DONE, KVTransferDone, broker.on_transfer_done)
        await bus.serve(subjects.KV_LOOKUP, KVLookup, broker.on_lookup, queue=subjects.BROKER_QUEUE)
        await heartbeats.start()
        log.info("KV broker %s ready", config.broker_id)
        await stop.wait()
    finally:
        await heartbeats.stop()
        await broker.membership.stop()
        await bus.close()
