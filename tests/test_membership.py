"""Membership: silence is counted only while this service could have heard the members."""

from __future__ import annotations

import asyncio
import time

from pdserve.membership import Membership
from pdserve.protocol import Heartbeat


class FakeBus:
    """What Membership reads of a Bus: subscriptions (none needed here) and the connection's state."""

    def __init__(self) -> None:
        self.connected = True
        self.num_reconnects = 0

    async def subscribe(self, *args, **kwargs) -> None:
        return None


def heartbeat(worker_id: str, interval_s: float) -> Heartbeat:
    return Heartbeat(worker_id=worker_id, role="decode", interval_s=interval_s, sent_at=time.time(),
                     started_at=time.time())


async def test_a_silent_member_is_gone_after_its_missed_heartbeats():
    membership, gone = Membership(), []
    membership.on_gone.append(gone.append)
    await membership.start(FakeBus(), prune_interval_s=0.02)
    try:
        await membership._on_heartbeat(heartbeat("w1", interval_s=0.05))
        assert [hb.worker_id for hb in membership.live()] == ["w1"]
        await asyncio.sleep(0.3)
        assert gone == ["w1"] and membership.live() == []
    finally:
        await membership.stop()


async def test_nobody_is_gone_while_this_service_is_cut_off_from_nats_and_all_get_a_full_allowance_after():
    bus, membership, gone = FakeBus(), Membership(), []
    membership.on_gone.append(gone.append)
    await membership.start(bus, prune_interval_s=0.02)
    try:
        await membership._on_heartbeat(heartbeat("w1", interval_s=0.05))
        bus.connected = False  # a NATS restart: no heartbeat can reach us
        await asyncio.sleep(0.3)
        assert gone == [] and [hb.worker_id for hb in membership.live()] == ["w1"]
        bus.connected, bus.num_reconnects = True, 1
        await asyncio.sleep(0.1)  # less than 3 intervals after the reconnect: w1 still has time to heartbeat
        assert gone == [] and [hb.worker_id for hb in membership.live()] == ["w1"]
        await asyncio.sleep(0.3)  # still silent long after the reconnect: now it is gone
        assert gone == ["w1"] and membership.live() == []
    finally:
        await membership.stop()


async def test_a_reconnect_between_two_checks_still_restarts_the_silence_clocks():
    bus, membership, gone = FakeBus(), Membership(), []
    membership.on_gone.append(gone.append)
    await membership.start(bus, prune_interval_s=3600)  # only live() checks
    try:
        await membership._on_heartbeat(heartbeat("w1", interval_s=0.05))
        await asyncio.sleep(0.2)  # silent for longer than its allowance, but we were reconnecting meanwhile
        bus.num_reconnects = 1
        assert [hb.worker_id for hb in membership.live()] == ["w1"] and gone == []
    finally:
        await membership.stop()


async def test_a_heartbeat_that_counts_one_more_reconnect_is_told_to_the_listeners():
    membership, reconnected = Membership(), []
    membership.on_reconnected.append(reconnected.append)
    await membership._on_heartbeat(heartbeat("w1", interval_s=1.0))
    await membership._on_heartbeat(heartbeat("w1", interval_s=1.0))
    assert reconnected == []
    await membership._on_heartbeat(heartbeat("w1", interval_s=1.0).model_copy(update={"num_reconnects": 1}))
    await membership._on_heartbeat(heartbeat("w1", interval_s=1.0).model_copy(update={"num_reconnects": 1}))
    assert reconnected == ["w1"]
