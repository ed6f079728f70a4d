"""KVAwarePolicy without services: the cost formula, the choice it makes, and the route plan."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from pdserve.protocol import Heartbeat, KVLayout, ModelCard
from services.router.policy import CostWeights, KVAwarePolicy, route_cost

MODEL = "m"
BLOCK_SIZE = 32


def make_heartbeat(worker_id: str, role: str, **load) -> Heartbeat:
    card = ModelCard(name=MODEL, tokenizer="byte", max_model_len=4096,
                     kv_layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", dtype_bytes=2,
                                        block_size=BLOCK_SIZE))
    now = time.time()
    return Heartbeat(worker_id=worker_id, role=role, model=card, interval_s=1.0, sent_at=now, started_at=now, **load)


class FakeMembership:
    def __init__(self, *heartbeats: Heartbeat):
        self.heartbeats = list(heartbeats)

    def live(self, role=None, model=None):
        return [hb for hb in self.heartbeats if (role is None or hb.role == role)
                and (model is None or hb.model is not None and hb.model.name == model)]

    def get(self, worker_id):
        return next((hb for hb in self.heartbeats if hb.worker_id == worker_id), None)

    def beat(self, hb: Heartbeat) -> None:
        """A newer heartbeat of the same worker arrives."""
        self.heartbeats = [hb if old.worker_id == hb.worker_id else old for old in self.heartbeats]


def make_policy(*heartbeats: Heartbeat, seed: int = 0, **kw) -> KVAwarePolicy:
    return KVAwarePolicy(FakeMembership(*heartbeats), rng=random.Random(seed), **kw)


def test_cost_is_the_documented_weighted_sum():
    w = CostWeights(recompute=1.0, queue=8.0, running=4.0, kv=16.0)
    assert route_cost(w, 10, 4, 2, 1, 0.5) == 1.0 * 6 + 8.0 * 2 + 4.0 * 1 + 16.0 * 0.5
    assert route_cost(w, 10, 12, 0, 0, 0.0) == 0  # matched beyond the prompt never makes a negative term
    assert route_cost(CostWeights(2, 3, 5, 7), 4, 1, 1, 1, 1.0) == 2 * 3 + 3 + 5 + 7


def test_in_flight_requests_the_heartbeat_does_not_show_count_as_queued():
    hb = make_heartbeat("p1", "prefill", num_queued=1, num_running=1)
    policy = make_policy(hb)
    assert policy.cost(hb) == 8 + 4
    for _ in range(5):
        policy.acquire("p1")
    assert policy.cost(hb) == 8 * (1 + 3) + 4  # 5 in flight, 2 of them already in the heartbeat


def test_requests_that_ended_since_the_heartbeat_showed_them_no_longer_count():
    # d1 finished this router's request just after its heartbeat showed it running; d2 is still decoding one.
    d1, d2 = make_heartbeat("d1", "decode"), make_heartbeat("d2", "decode")
    policy = make_policy(d1, d2)
    seen1, seen2 = policy.acquire("d1"), policy.acquire("d2")
    assert (seen1, seen2) == (d1, d2)
    d1_shows_it, d2_shows_it = make_heartbeat("d1", "decode", num_running=1), make_heartbeat("d2", "decode", num_running=1)
    policy._membership.beat(d1_shows_it)
    policy._membership.beat(d2_shows_it)
    assert policy.cost(d1_shows_it) == policy.cost(d2_shows_it) == 4
    policy.release("d1", seen1)
    assert policy.cost(d1_shows_it) == 0 and policy.load(d1_shows_it) == 0  # not a stale 4 for up to a second
    assert [policy.choose("decode", MODEL).worker_id for _ in range(20)] == ["d1"] * 20
    # the next heartbeat is the truth again (here: another router's request runs on d1)
    d1_next = make_heartbeat("d1", "decode", num_running=1)
    policy._membership.beat(d1_next)
    assert policy.cost(d1_next) == 4


def test_a_request_no_heartbeat_showed_ends_without_discounting_the_next_one():
    hb = make_heartbeat("p1", "prefill", num_running=1)  # another router's request
    policy = make_policy(hb)
    policy.release("p1", policy.acquire("p1"))  # started and ended within one heartbeat interval
    assert policy.cost(hb) == 4 and policy.load(hb) == 1


def test_the_worker_holding_the_prefix_wins_unless_it_is_loaded_more_than_the_prefix_is_worth():
    holder, other = make_heartbeat("p1", "prefill", num_running=1), make_heartbeat("p2", "prefill")
    policy = make_policy(holder, other)
    # 20 of 24 blocks held: recompute 4 + running 4 = 8 < 24 on the idle worker
    assert policy.choose("prefill", MODEL, num_prompt_blocks=24, matched={"p1": 20}).worker_id == "p1"
    # 2 of 24 held: 22 + 4 = 26 > 24
    assert policy.choose("prefill", MODEL, num_prompt_blocks=24, matched={"p1": 2}).worker_id == "p2"
    # nothing held: load decides
    assert policy.choose("prefill", MODEL, num_prompt_blocks=24, matched={}).worker_id == "p2"


def test_kv_usage_weighs_in_and_ties_are_broken_at_random():
    full, empty = make_heartbeat("d1", "decode", kv_usage=0.9), make_heartbeat("d2", "decode", kv_usage=0.1)
    assert make_policy(full, empty).choose("decode", MODEL).worker_id == "d2"
    a, b = make_heartbeat("d1", "decode"), make_heartbeat("d2", "decode")
    policy = make_policy(a, b)
    chosen = Counter(policy.choose("decode", MODEL).worker_id for _ in range(200))
    assert chosen["d1"] > 50 and chosen["d2"] > 50, chosen


def test_round_robin_takes_turns_and_least_load_ignores_the_cache():
    workers = [make_heartbeat(f"p{i}", "prefill") for i in range(3)]
    rr = make_policy(*workers, mode="round_robin")
    assert [rr.choose("prefill", MODEL, matched={"p0": 50}, num_prompt_blocks=50).worker_id for _ in range(6)] == \
        ["p0", "p1", "p2", "p0", "p1", "p2"]
    loaded = make_heartbeat("p0", "prefill", num_queued=1)
    ll = make_policy(loaded, make_heartbeat("p1", "prefill"), mode="least_load")
    assert ll.choose("prefill", MODEL, matched={"p0": 50}, num_prompt_blocks=50).worker_id == "p1"
    kv = make_policy(loaded, make_heartbeat("p1", "prefill"))
    assert kv.choose("prefill", MODEL, matched={"p0": 50}, num_prompt_blocks=50).worker_id == "p0"


def two_by_two(**kw) -> KVAwarePolicy:
    return make_policy(make_heartbeat("p1", "prefill"), make_heartbeat("p2", "prefill"),
                       make_heartbeat("d1", "decode"), make_heartbeat("d2", "decode", num_running=1), **kw)


def test_plan_whole_prompt_on_a_decode_worker_goes_straight_there():
    plan = two_by_two().plan(MODEL, 20 * BLOCK_SIZE + 5, BLOCK_SIZE, {"d2": 20, "p1": 20}, "ok")
    assert (plan.reason, plan.prefill, plan.decode.worker_id) == ("cache_hit", None, "d2")
    assert plan.attributes()["decode_num_matched_blocks"] == 20 and plan.attributes()["route_prefill_worker_id"] == ""


def test_plan_prefix_on_a_prefill_worker_prefills_there_and_decodes_on_the_least_loaded():
    plan = two_by_two().plan(MODEL, 30 * BLOCK_SIZE, BLOCK_SIZE, {"p2": 20}, "ok")
    assert (plan.reason, plan.prefill.worker_id, plan.decode.worker_id) == ("prefix_hit", "p2", "d1")
    assert plan.num_matched_blocks(plan.prefill) == 20 and plan.num_prompt_blocks == 30


def test_plan_short_rest_after_the_decode_workers_hit_is_prefilled_locally():
    matched = {"d2": 20, "p1": 20}
    num_tokens = 20 * BLOCK_SIZE + 40  # 40 tokens left on d2
    assert two_by_two(local_prefill_max_tokens=41).plan(MODEL, num_tokens, BLOCK_SIZE, matched).reason == "local_prefill"
    plan = two_by_two(local_prefill_max_tokens=40).plan(MODEL, num_tokens, BLOCK_SIZE, matched)
    assert (plan.reason, plan.prefill.worker_id) == ("prefix_hit", "p1")
    assert two_by_two().plan(MODEL, 10, BLOCK_SIZE, {}).reason == "load"  # 0: off, even for tiny prompts


@pytest.mark.parametrize("limit, local", [(2, True), (3, False), (0, False)])
def test_plan_every_prefill_queue_at_its_limit_means_local_prefill(limit, local):
    policy = make_policy(make_heartbeat("p1", "prefill", num_queued=2), make_heartbeat("p2", "prefill", num_running=1),
                         make_heartbeat("d1", "decode"), prefill_queue_limit=limit)
    policy.acquire("p2")
    policy.acquire("p2")  # p2: heartbeat says 1, this router has 2 in flight
    plan = policy.plan(MODEL, 100, BLOCK_SIZE, {})
    assert (plan.reason == "prefill_queues_full") == local and (plan.prefill is None) == local


def test_plan_without_a_prefill_worker_has_decode_serve_alone():
    plan = make_policy(make_heartbeat("d1", "decode")).plan(MODEL, 100, BLOCK_SIZE, {})
    assert (plan.reason, plan.prefill, plan.decode.worker_id) == ("no_prefill_worker", None, "d1")


def test_plan_never_pairs_a_decode_worker_with_a_prefill_worker_it_marked_unreachable():
    # d1 (least loaded) cannot reach p1; p1 holds the prefix: p1 prefills, d2 decodes.
    policy = make_policy(make_heartbeat("p1", "prefill"), make_heartbeat("p2", "prefill", num_running=3),
                         make_heartbeat("d1", "decode", unreachable_peer_ids=("p1",)),
                         make_heartbeat("d2", "decode", num_running=2))
    for _ in range(20):  # ties are broken at random: every draw must avoid the pair
        plan = policy.plan(MODEL, 30 * BLOCK_SIZE, BLOCK_SIZE, {"p1": 20}, "ok")
        assert (plan.prefill.worker_id, plan.decode.worker_id) == ("p1", "d2")
        plan = policy.plan(MODEL, 30 * BLOCK_SIZE, BLOCK_SIZE, {}, "ok")
        assert (plan.prefill.worker_id, plan.decode.worker_id) != ("p1", "d1")


def test_plan_with_no_working_pair_for_the_best_prefill_worker_takes_one_the_decode_worker_reaches():
    policy = make_policy(make_heartbeat("p1", "prefill"), make_heartbeat("p2", "prefill", num_running=3),
                         make_heartbeat("d1", "decode", unreachable_peer_ids=("p1",)))
    plan = policy.plan(MODEL, 30 * BLOCK_SIZE, BLOCK_SIZE, {"p1": 20}, "ok")
    assert (plan.reason, plan.prefill.worker_id, plan.decode.worker_id) == ("load", "p2", "d1")


def test_plan_with_every_prefill_worker_unreachable_prefills_on_decode():
    policy = make_policy(make_heartbeat("p1", "prefill"), make_heartbeat("p2", "prefill"),
                         make_heartbeat("d1", "decode", unreachable_peer_ids=("p1", "p2")))
    plan = policy.plan(MODEL, 30 * BLOCK_SIZE, BLOCK_SIZE, {}, "ok")
    assert (plan.reason, plan.prefill, plan.decode.worker_id) == ("prefill_unreachable", None, "d1")
    # choose_decode_reaching: the request's KV is on p2; nobody reaches it
    assert policy.choose_decode_reaching(MODEL, "p2") is None
