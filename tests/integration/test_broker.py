"""The KV broker over a real nats-server: KV events in, lookups out, departed workers dropped."""

import asyncio
import time

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.config import BrokerConfig
from pdserve.kv.hashing import block_hashes
from pdserve.protocol import Goodbye, Heartbeat, KVEvent, KVLookup, KVLookupReply, KVTransferDone
from services.kv_broker.main import Broker


async def start_broker(bus: Bus) -> Broker:
    broker = Broker(BrokerConfig(broker_id="b1"))
    await broker.membership.start(bus)
    await bus.subscribe(subjects.KV_EVENTS_ALL, KVEvent, broker.on_kv_event)
    await bus.subscribe(subjects.KV_TRANSFER_DONE, KVTransferDone, broker.on_transfer_done)
    await bus.serve(subjects.KV_LOOKUP, KVLookup, broker.on_lookup, queue=subjects.BROKER_QUEUE)
    return broker


async def test_events_lookup_and_goodbye(nats):
    broker_bus = await Bus.connect(nats.url, "broker")
    worker = await Bus.connect(nats.url, "worker")
    try:
        broker = await start_broker(broker_bus)
        hashes = block_hashes(list(range(80)), 16)
        for worker_id, held in (("w1", hashes), ("w2", hashes[:2])):
            await worker.publish(subjects.heartbeat("prefill", worker_id), Heartbeat(
                worker_id=worker_id, role="prefill", interval_s=1, sent_at=time.time(), started_at=time.time()))
            await worker.publish(subjects.kv_events(worker_id), KVEvent(worker_id=worker_id, model="m", stored=tuple(held)))
        await worker.publish(subjects.KV_TRANSFER_DONE, KVTransferDone(
            request_id="r", prefill_worker_id="w1", decode_worker_id="d", ok=True, num_blocks=5, num_bytes=100))
        await worker.flush()
        await asyncio.sleep(0.2)
        reply = await worker.request(subjects.KV_LOOKUP, KVLookup(model="m", block_hashes=tuple(hashes)), KVLookupReply, timeout_s=2)
        assert reply.num_matched_blocks == {"w1": 5, "w2": 2}
        assert (broker.num_transfers_ok, broker.num_bytes_transferred) == (1, 100)
        await worker.publish(subjects.goodbye("prefill", "w1"), Goodbye(worker_id="w1", role="prefill"))
        await worker.flush()
        await asyncio.sleep(0.2)
        reply = await worker.request(subjects.KV_LOOKUP, KVLookup(model="m", block_hashes=tuple(hashes)), KVLookupReply, timeout_s=2)
        assert reply.num_matched_blocks == {"w2": 2}
    finally:
        await worker.close()
        await broker_bus.close()


async def test_worker_missing_three_heartbeats_is_dropped(nats):
    broker_bus = await Bus.connect(nats.url, "broker")
    worker = await Bus.connect(nats.url, "worker")
    try:
        broker = await start_broker(broker_bus)
        hashes = block_hashes(list(range(32)), 16)
        await worker.publish(subjects.heartbeat("decode", "w9"), Heartbeat(
            worker_id="w9", role="decode", interval_s=0.1, sent_at=time.time(), started_at=time.time()))
        await worker.publish(subjects.kv_events("w9"), KVEvent(worker_id="w9", model="m", stored=tuple(hashes)))
        await worker.flush()
        await asyncio.sleep(0.1)
        assert [hb.worker_id for hb in broker.membership.live()] == ["w9"]
        await asyncio.sleep(0.4)  # > 3 intervals without a heartbeat
        reply = await worker.request(subjects.KV_LOOKUP, KVLookup(model="m", block_hashes=tuple(hashes)), KVLookupReply, timeout_s=2)
        assert reply.num_matched_blocks == {}
        assert broker.membership.live() == []
    finally:
        await worker.close()
        await broker_bus.close()
