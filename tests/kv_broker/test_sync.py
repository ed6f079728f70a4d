import time

from pdserve.protocol import Heartbeat, KVEvent
from services.kv_broker.sync import EventSequences


def event(seq: int, worker_id: str = "w1", cleared: bool = False) -> KVEvent:
    return KVEvent(worker_id=worker_id, model="m", seq=seq, cleared=cleared)


def heartbeat(kv_event_seq: int, worker_id: str = "w1") -> Heartbeat:
    return Heartbeat(worker_id=worker_id, role="prefill", kv_event_seq=kv_event_seq, interval_s=1,
                     sent_at=time.time(), started_at=time.time())


def test_events_in_order_need_nothing_and_a_gap_asks_once_until_the_snapshot():
    seqs = EventSequences(retry_s=60)
    assert [seqs.on_event(event(n)) for n in (1, 2, 3)] == [False] * 3
    assert seqs.on_event(event(5)) is True
    assert seqs.on_event(event(7)) is False  # asked already; the snapshot is on its way
    assert seqs.on_event(event(8, cleared=True)) is False  # the snapshot: counting starts again here
    assert seqs.on_event(event(10)) is True and seqs.num_gaps == 3


def test_a_first_event_that_is_not_the_first_asks_and_unnumbered_events_never_do():
    seqs = EventSequences(retry_s=60)
    assert seqs.on_event(event(40)) is True  # this broker started after the worker
    assert seqs.on_event(event(1, worker_id="w2")) is False
    assert seqs.on_event(event(0, worker_id="w3")) is False and seqs.on_event(event(0, worker_id="w3")) is False


def test_asking_again_waits_retry_s():
    seqs = EventSequences(retry_s=0.05)
    assert seqs.on_event(event(3)) is True
    assert seqs.on_event(event(5)) is False
    time.sleep(0.06)
    assert seqs.on_event(event(7)) is True


def test_a_heartbeat_ahead_of_what_was_applied_for_a_whole_interval_asks():
    seqs = EventSequences(retry_s=60)
    seqs.on_event(event(1))
    assert seqs.on_heartbeat(heartbeat(1)) is False
    assert seqs.on_heartbeat(heartbeat(2)) is False  # event 2 may still be in flight
    seqs.on_event(event(2))
    assert seqs.on_heartbeat(heartbeat(3)) is False
    assert seqs.on_heartbeat(heartbeat(3)) is True  # event 3 never came: lost with nothing after it
    seqs.forget("w1")
    assert seqs.on_heartbeat(heartbeat(3)) is False and seqs.applied("w1") == 0
