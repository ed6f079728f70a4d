"""The worker's KV event relay: copies counted, the wire idempotent and numbered, snapshots complete."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.kv.events import MAX_BLOCKS_PER_EVENT, KVEventRelay
from pdserve.kv.hashing import ROOT_HASH, chain_hashes
from pdserve.protocol import KVEvent, KVResync
from services.kv_broker.index import BlockIndex


class Wire:
    """A relay whose queued events are read straight from its queue (no NATS, no task)."""

    def __init__(self) -> None:
        self.relay = KVEventRelay("w1", "m", self._never)

    async def _never(self, event: KVEvent) -> None:
        raise AssertionError("not started")

    def take(self) -> list[KVEvent]:
        events = []
        while not self.relay._queue.empty():
            events.append(self.relay._queue.get_nowait())
        return events


def apply(index: BlockIndex, events: list[KVEvent]) -> None:
    for e in events:  # what the broker does with an event
        if e.cleared:
            index.drop_worker(e.worker_id)
        index.store(e.worker_id, e.model, e.stored, e.parent_hash)
        index.remove(e.worker_id, e.model, e.removed)
        index.set_tier(e.worker_id, e.to_host, e.to_device)


def test_only_the_first_copy_is_stored_and_the_last_removed():
    wire = Wire()
    chain = chain_hashes(range(4), 1, ROOT_HASH)
    wire.relay.stored(chain[:2], ROOT_HASH)
    wire.relay.stored(chain, ROOT_HASH)  # blocks 0, 1 again; 2, 3 new: one chain under block 1
    events = wire.take()
    assert [(e.stored, e.parent_hash, e.seq) for e in events] == [
        (tuple(chain[:2]), ROOT_HASH, 1), (tuple(chain[2:]), chain[1], 2)]
    wire.relay.removed(chain)  # second copies of 0, 1 stay; 2, 3 go
    wire.relay.removed([12345])  # never held
    assert [(e.removed, e.seq) for e in wire.take()] == [(tuple(chain[2:]), 3)]
    wire.relay.removed(chain[:2])
    assert [e.removed for e in wire.take()] == [tuple(chain[:2])]
    assert wire.relay.num_blocks == 0


def test_a_held_block_in_the_middle_splits_the_chain():
    wire = Wire()
    chain = chain_hashes(range(5), 1, ROOT_HASH)
    wire.relay.stored(chain[2:3], chain[1])
    wire.relay.stored(chain, ROOT_HASH)
    events = wire.take()[1:]
    assert [(e.stored, e.parent_hash) for e in events] == [(tuple(chain[:2]), ROOT_HASH), (tuple(chain[3:]), chain[2])]


def test_long_chains_and_removals_are_cut_into_bounded_events():
    wire = Wire()
    chain = chain_hashes(range(MAX_BLOCKS_PER_EVENT + 10), 1, ROOT_HASH)
    wire.relay.stored(chain, ROOT_HASH)
    events = wire.take()
    assert [len(e.stored) for e in events] == [MAX_BLOCKS_PER_EVENT, 10]
    assert events[1].parent_hash == chain[MAX_BLOCKS_PER_EVENT - 1]
    wire.relay.removed(chain)
    assert [len(e.removed) for e in wire.take()] == [MAX_BLOCKS_PER_EVENT, 10]


async def test_resync_for_this_worker_or_all_sends_a_snapshot_and_others_are_ignored():
    wire = Wire()
    wire.relay.stored(chain_hashes(range(3), 1, ROOT_HASH), ROOT_HASH)
    wire.take()
    await wire.relay.on_resync(KVResync(broker_id="b", worker_id="someone-else"))
    assert wire.take() == []
    await wire.relay.on_resync(KVResync(broker_id="b", worker_id="w1"))
    await wire.relay.on_resync(KVResync(broker_id="b"))
    events = wire.take()
    assert [e.cleared for e in events] == [True, False, True, False] and wire.relay.num_snapshots == 2


copy_ops = st.lists(st.one_of(
    st.tuples(st.just("stored"), st.integers(0, 3), st.integers(0, 5), st.integers(1, 6)),
    st.tuples(st.just("removed"), st.integers(0, 3), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("stored_host"), st.integers(0, 3), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("removed_host"), st.integers(0, 3), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("cleared")),
), max_size=50)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=4, max_size=4), copy_ops)
def test_the_broker_sees_exactly_the_blocks_with_a_copy_and_a_snapshot_rebuilds_them(prompts, ops):
    """Copies in the engine and in the host tier: the index holds every block with a copy, marked host tier
    where only the host tier has one."""
    chains = [chain_hashes(p, 1, ROOT_HASH) for p in prompts]
    wire = Wire()
    copies: dict[int, int] = {}  # what the engine holds: block -> copies
    host: dict[int, int] = {}  # what its host tier holds: block -> copies
    index = BlockIndex()
    for op in ops:
        if op[0] == "stored":
            chain = chains[op[1]]
            start = min(op[2], len(chain) - 1)
            blocks = chain[start:start + op[3]]
            wire.relay.stored(blocks, chain[start - 1] if start else ROOT_HASH)
            for h in blocks:
                copies[h] = copies.get(h, 0) + 1
        elif op[0] == "removed":
            blocks = []
            for h in [chains[op[1]][i] for i in op[2] if i < len(chains[op[1]])]:
                if copies.get(h):  # an engine only frees copies it has
                    copies[h] -= 1
                    blocks.append(h)
            wire.relay.removed(blocks)
        elif op[0] == "stored_host":  # the tier takes copies of blocks held (in the engine or the tier)
            blocks = [h for h in [chains[op[1]][i] for i in op[2] if i < len(chains[op[1]])]
                      if copies.get(h) or host.get(h)]
            wire.relay.stored_host(blocks)
            for h in blocks:
                host[h] = host.get(h, 0) + 1
        elif op[0] == "removed_host":
            blocks = []
            for h in [chains[op[1]][i] for i in op[2] if i < len(chains[op[1]])]:
                if host.get(h):
                    host[h] -= 1
                    blocks.append(h)
            wire.relay.removed_host(blocks)
        elif op[0] == "snapshot":
            wire.relay.snapshot()
        else:
            wire.relay.cleared()
            copies.clear()
            host.clear()
        apply(index, wire.take())
        held = {h for h, n in copies.items() if n} | {h for h, n in host.items() if n}
        assert index.held("w1", "m") == held
        assert index.host_only("w1") == {h for h in held if not copies.get(h)}
    fresh = BlockIndex()
    wire.relay.snapshot()
    events = wire.take()
    apply(fresh, events)
    assert fresh.view() == index.view()
    assert fresh.host_only("w1") == index.host_only("w1")
    assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + len(events)))
    for chain in chains:  # parents came along: lookups agree too
        assert fresh.lookup("m", chain) == index.lookup("m", chain)


async def test_events_are_published_in_order_and_stop_sends_what_is_queued():
    sent: list[KVEvent] = []

    async def publish(event: KVEvent) -> None:
        if event.seq == 2:
            raise ConnectionError("NATS is down")  # lost: the broker will see the gap
        await asyncio.sleep(0)
        sent.append(event)

    relay = KVEventRelay("w1", "m", publish)
    await relay.start()
    chain = chain_hashes(range(8), 1, ROOT_HASH)
    for k in range(len(chain)):
        relay.stored(chain[k:k + 1], chain[k - 1] if k else ROOT_HASH)
    relay.removed(chain)
    await relay.stop()
    assert [e.seq for e in sent] == [1] + list(range(3, 10))
    assert relay.sent_seq == 9  # heartbeats announce the lost one too, so the broker knows it is behind
