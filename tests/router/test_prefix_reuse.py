"""PrefixReuse's choice without services: whom a prefill worker pulls a cached prefix from, and whether the cost
model says pulling beats computing. The membership is the policy tests' stand-in (heartbeats in a list); the lease
itself and the pull run end to end in tests/e2e/test_prefix_reuse.py."""

from __future__ import annotations

from pdserve.config import RouterConfig
from pdserve.protocol import KVReady
from services.router.policy import RoutePlan
from services.router.prefix_reuse import PrefixReuse
from tests.router.test_policy import FakeMembership, make_heartbeat

NUM_BLOCKS = 20
PROMPT_TOKENS = 20 * 32 + 5  # 20 full blocks of 32 tokens and 5 more


def reuse_among(*heartbeats, **config) -> tuple[PrefixReuse, object]:
    reuse = PrefixReuse(RouterConfig(**config), bus=None, membership=FakeMembership(*heartbeats))
    return reuse, heartbeats[0].model


def plan(cached_by: dict[str, int], decode) -> RoutePlan:
    return RoutePlan("load", decode, None, NUM_BLOCKS, {}, cached_by=cached_by, block_hashes=tuple(range(NUM_BLOCKS)))


def workers(reuses: bool = True):
    return (make_heartbeat("p1", "prefill", reuses_peer_prefixes=reuses),
            make_heartbeat("p2", "prefill", reuses_peer_prefixes=reuses),
            make_heartbeat("d1", "decode", reuses_peer_prefixes=reuses))


def test_the_prefill_peer_with_the_most_blocks_is_the_source():
    p1, p2, d1 = workers()
    reuse, card = reuse_among(p1, p2, d1)
    # d1 holds more, but decode workers are not leased from: it is busy decoding
    assert reuse.source(plan({"p2": 12, "d1": 18, "p1": 3}, d1), "p1", card, PROMPT_TOKENS) == ("p2", 12)
    assert reuse.source(plan({"p2": 3, "p1": 3}, d1), "p1", card, PROMPT_TOKENS) is None  # nothing more there
    assert reuse.source(plan({}, d1), "p1", card, PROMPT_TOKENS) is None


def test_the_block_of_the_prompts_last_token_is_never_pulled():
    p1, p2, d1 = workers()
    reuse, card = reuse_among(p1, p2, d1)
    # a prompt of exactly 20 blocks: its last token is computed, so its last block is too
    assert reuse.source(plan({"p2": 20}, d1), "p1", card, 20 * 32) == ("p2", 19)
    assert reuse.source(plan({"p2": 20}, d1), "p1", card, 20 * 32 + 1) == ("p2", 20)
    assert reuse.source(plan({"p2": 20, "p1": 19}, d1), "p1", card, 20 * 32) is None


def test_engines_that_do_not_take_part_are_left_alone():
    p1, p2, d1 = workers(reuses=False)
    reuse, card = reuse_among(p1, p2, d1)
    assert reuse.source(plan({"p2": 12}, d1), "p1", card, PROMPT_TOKENS) is None
    reuse, card = reuse_among(*workers(), kv_prefix_reuse=False)
    assert reuse.source(plan({"p2": 12}, workers()[2]), "p1", card, PROMPT_TOKENS) is None


def test_the_cost_model_weighs_bytes_over_bandwidth_against_tokens_at_the_prefill_rate():
    p1, p2, d1 = workers()
    reuse, card = reuse_among(p1, p2, d1)
    # ms per computed token, learned from a KV-ready answer: 1,000 tokens computed in 100 ms
    reuse.observe(KVReady(request_id="r", worker_id="p1", first_token_id=1, first_text="x", num_prompt_tokens=1000,
                          prefill_ms=100.0))
    assert reuse.ms_per_prompt_token == 0.1
    block_bytes = card.kv_layout.bytes_per_block
    # 10 blocks x 32 tokens x 0.1 ms = 32 ms of compute; the same blocks' bytes at 1 GB/s take microseconds
    assert reuse.source(plan({"p2": 10}, d1), "p1", card, PROMPT_TOKENS) == ("p2", 10)
    # a pull measured at 10 bytes/ms (10 KB/s): slower than computing
    reuse.pull_gbps = 10 / 1e6
    assert 10 * block_bytes / 10 > 32
    assert reuse.source(plan({"p2": 10}, d1), "p1", card, PROMPT_TOKENS) is None
    # measured pulls move the estimate
    reuse.observe(KVReady(request_id="r", worker_id="p1", first_token_id=1, first_text="x", num_prompt_tokens=1000,
                          num_peer_loaded_tokens=990, num_peer_loaded_bytes=10**9, peer_load_ms=100.0, prefill_ms=101.0))
    assert reuse.pull_gbps > 1.0
    assert reuse.source(plan({"p2": 10}, d1), "p1", card, PROMPT_TOKENS) == ("p2", 10)
