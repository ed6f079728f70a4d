"""The KV broker over a real nats-server: KV events in, lookups out, departed workers dropped, and an index
rebuilt from the workers' snapshots after a restart or lost events."""

import asyncio
import time

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.config import BrokerConfig
from pdserve.kv.events import KVEventRelay
from pdserve.kv.hashing import ROOT_HASH, block_hashes
from pdserve.protocol import Goodbye, Heartbeat, KVEvent, KVLookup, KVLookupReply, KVResync, KVTransferDone
from services.kv_broker.main import Broker


async def start_broker(bus: Bus, broker_id: str = "b1") -> Broker:
    broker = Broker(BrokerConfig(broker_id=broker_id))
    await broker.start(bus)
    return broker


class RelayWorker:
    """A worker's KV side without an engine: the real relay on its own NATS connection."""

    def __init__(self, worker_id: str, lose: set[int] = frozenset()):
        self.worker_id = worker_id
        self.lose = set(lose)  # seqs of events "lost" on the way (never published)

    async def start(self, url: str) -> "RelayWorker":
        self.bus = await Bus.connect(url, self.worker_id)
        self.relay = KVEventRelay(self.worker_id, "m", self._publish)
        await self.relay.start()
        await self.bus.subscribe(subjects.KV_RESYNC, KVResync, self.relay.on_resync)
        return self

    async def _publish(self, event: KVEvent) -> None:
        if event.seq not in self.lose:
            await self.bus.publish(subjects.kv_events(self.worker_id), event)

    async def beat(self, interval_s: float = 1.0) -> None:
        await self.bus.publish(subjects.heartbeat("prefill", self.worker_id), Heartbeat(
            worker_id=self.worker_id, role="prefill", kv_event_seq=self.relay.sent_seq, interval_s=interval_s,
            sent_at=time.time(), started_at=time.time()))

    async def settle(self) -> None:
        await self.relay._queue.join()
        await self.bus.flush()

    def truth(self) -> frozenset[int]:
        return frozenset(self.relay.held())

    async def close(self) -> None:
        await self.relay.stop()
        await self.bus.close()


async def wait_for(condition, timeout_s: float = 5.0) -> float:
    """Seconds until condition() held; AssertionError after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


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


def prompt_chain(seed: int, num_blocks: int = 6) -> list[int]:
    return block_hashes([seed * 1000 + t for t in range(16 * num_blocks)], 16)


async def test_a_restarted_broker_rebuilds_its_index_from_the_workers(nats):
    workers = [await RelayWorker(f"w{i}").start(nats.url) for i in range(3)]
    first_bus = await Bus.connect(nats.url, "broker-1")
    second_bus = None
    try:
        first = await start_broker(first_bus, "b1")
        shared = prompt_chain(1)
        for i, worker in enumerate(workers):
            worker.relay.stored(shared[: 2 + i], ROOT_HASH)
            worker.relay.stored(prompt_chain(10 + i), ROOT_HASH)
        workers[2].relay.removed([shared[1]])  # a hole in the middle of w2's prefix
        for worker in workers:
            await worker.settle()
        truth = {"m": {w.worker_id: w.truth() for w in workers}}
        await wait_for(lambda: first.index.view() == truth)
        answer = first.index.lookup("m", shared)
        assert answer == {"w0": 2, "w1": 3, "w2": 1}

        await first.stop()
        await first_bus.close()  # the broker is gone; workers go on storing and removing meanwhile
        workers[0].relay.stored(shared[2:5], shared[1])
        workers[1].relay.removed(prompt_chain(11)[3:])
        for worker in workers:
            await worker.settle()
        truth = {"m": {w.worker_id: w.truth() for w in workers}}

        second_bus = await Bus.connect(nats.url, "broker-2")
        second = await start_broker(second_bus, "b2")
        seconds = await wait_for(lambda: second.index.view() == truth, timeout_s=5)
        assert second.index.lookup("m", shared) == {"w0": 5, "w1": 3, "w2": 1}
        print(f"index rebuilt {seconds * 1000:.0f} ms after the broker started")
        reply = await workers[0].bus.request(subjects.KV_LOOKUP, KVLookup(model="m", block_hashes=tuple(shared)),
                                             KVLookupReply, timeout_s=2)
        assert reply.num_matched_blocks == {"w0": 5, "w1": 3, "w2": 1} and reply.broker_id == "b2"
    finally:
        for worker in workers:
            await worker.close()
        if second_bus is not None:
            await second_bus.close()


async def test_a_lost_event_is_repaired_by_a_snapshot_after_a_gap_or_a_heartbeat(nats):
    # seq 1: the (empty) snapshot a started broker asks for; 2, 3: two stores, 3 lost; gap also removes (4).
    gap = await RelayWorker("gap", lose={3}).start(nats.url)
    tail = await RelayWorker("tail", lose={3}).start(nats.url)
    broker_bus = await Bus.connect(nats.url, "broker")
    try:
        broker = await start_broker(broker_bus)
        # A started broker asks everyone for a snapshot: wait for those (empty) ones first.
        await wait_for(lambda: gap.relay.num_snapshots == tail.relay.num_snapshots == 1)
        chain = prompt_chain(3)
        for worker in (gap, tail):
            await worker.beat()
            worker.relay.stored(chain[:2], ROOT_HASH)
            worker.relay.stored(chain[2:4], chain[1])
        gap.relay.removed(chain[:1])  # shows the gap
        for worker in (gap, tail):
            await worker.settle()
        await wait_for(lambda: broker.index.held("gap", "m") == gap.truth())
        assert gap.relay.num_snapshots == 2
        # tail's lost event was its last: only its heartbeats tell (a heartbeat later still behind).
        assert broker.index.held("tail", "m") == frozenset(chain[:2])
        await tail.beat()
        await tail.bus.flush()
        await asyncio.sleep(0.1)
        await tail.beat()
        await wait_for(lambda: broker.index.held("tail", "m") == tail.truth())
        assert tail.relay.num_snapshots == 2 and broker.sequences.num_gaps == 1
    finally:
        for worker in (gap, tail):
            await worker.close()
        await broker_bus.close()


async def test_late_events_of_a_departed_worker_are_ignored_until_it_beats_again(nats):
    worker = await RelayWorker("w1").start(nats.url)
    broker_bus = await Bus.connect(nats.url, "broker")
    try:
        broker = await start_broker(broker_bus)
        chain = prompt_chain(4)
        await worker.beat()
        await worker.bus.publish(subjects.goodbye("prefill", "w1"), Goodbye(worker_id="w1", role="prefill"))
        await worker.bus.flush()
        await wait_for(lambda: broker.membership.get("w1") is None)
        worker.relay.stored(chain, ROOT_HASH)
        await worker.settle()
        await asyncio.sleep(0.1)
        assert broker.index.view() == {}
        await worker.beat()  # back (a network partition healed): events count again, the next heartbeat
        await worker.bus.flush()  # shows the broker is behind, and a snapshot brings it up to date
        await wait_for(lambda: broker.membership.get("w1") is not None)
        await worker.beat()
        await wait_for(lambda: broker.index.held("w1", "m") == frozenset(chain))
    finally:
        await worker.close()
        await broker_bus.close()


async def test_a_worker_that_left_or_died_before_the_broker_heard_a_heartbeat_still_drops_out(nats, monkeypatch):
    left = await RelayWorker("left").start(nats.url)
    died = await RelayWorker("died").start(nats.url)
    broker_bus = await Bus.connect(nats.url, "broker")
    try:
        broker = await start_broker(broker_bus)
        chain = prompt_chain(5)
        for worker in (left, died):  # events (a snapshot for a restarted broker) but no heartbeat yet
            worker.relay.stored(chain, ROOT_HASH)
            await worker.settle()
        await wait_for(lambda: set(broker.index.lookup("m", chain)) == {"left", "died"})
        await left.bus.publish(subjects.goodbye("prefill", "left"), Goodbye(worker_id="left", role="prefill"))
        await wait_for(lambda: set(broker.index.lookup("m", chain)) == {"died"})
        monkeypatch.setattr("services.kv_broker.main.UNANNOUNCED_GRACE_S", 0.05)
        await asyncio.sleep(0.1)
        broker.sweep()  # "died" never beat and went quiet: dropped (the broker sweeps every second itself)
        assert broker.index.lookup("m", chain) == {}
    finally:
        for worker in (left, died):
            await worker.close()
        await broker_bus.close()
