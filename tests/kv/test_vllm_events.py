"""vLLM's KV cache events relayed under pdserve's hashes, without starting a vLLM engine.

vLLM's own BlockPool (prefix caching and KV events on) caches and evicts blocks of real vLLM Requests, its
own ZmqEventPublisher sends the batches over an ipc socket, and pdserve's subscriber and mapper feed a
KVEventRelay: the blocks the relay holds must be pdserve's chained hashes of exactly the token blocks
vLLM's cache holds. The mapper's refusals (unknown parents, LoRA, other groups and sizes) and a lost batch
are checked on hand-made events.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import (  # noqa: E402
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from pdserve.kv.events import KVEventRelay  # noqa: E402
from pdserve.kv.hashing import ROOT_HASH, block_hashes  # noqa: E402
from pdserve.kv.vllm_events import TOPIC, VllmKVEventMapper, VllmKVEventSubscriber  # noqa: E402

BS = 4


class Sink:
    def __init__(self) -> None:
        self.relay = KVEventRelay("w", "m", self._publish)

    async def _publish(self, event) -> None:
        pass

    def stored(self, block_hashes, parent_hash):
        self.relay.stored(block_hashes, parent_hash)

    def removed(self, block_hashes):
        self.relay.removed(block_hashes)

    def cleared(self):
        self.relay.cleared()

    def held(self) -> dict[int, int]:
        return self.relay.held()


def stored(hashes, parent, tokens, **extra) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS, lora_id=None,
                       medium="GPU", lora_name=None, **extra)


def test_stored_blocks_are_rehashed_with_their_parents_and_removed_per_copy():
    sink = Sink()
    mapper = VllmKVEventMapper(sink, BS)
    tokens = list(range(12))
    ours = block_hashes(tokens, BS)
    mapper.on_events([stored([b"a", b"b"], None, tokens[:8]), stored([b"c"], b"b", tokens[8:])])
    assert sink.held() == {ours[0]: ROOT_HASH, ours[1]: ours[0], ours[2]: ours[1]}
    mapper.on_events([stored([b"c"], b"b", tokens[8:])])  # a second copy of block c (another vLLM block)
    mapper.on_events([BlockRemoved(block_hashes=[b"c"], medium="GPU")])
    assert ours[2] in sink.held()
    mapper.on_events([BlockRemoved(block_hashes=[b"c", b"zz"], medium="GPU")])  # zz: never mapped
    assert set(sink.held()) == set(ours[:2])
    mapper.on_events([AllBlocksCleared()])
    assert sink.held() == {}


def test_blocks_pdserve_cannot_reuse_are_skipped():
    sink = Sink()
    mapper = VllmKVEventMapper(sink, BS)
    tokens = list(range(8))
    mapper.on_events([
        stored([b"x"], b"unknown-parent", tokens[:4]),
        stored([b"l"], None, tokens[:4], group_idx=1),  # another KV cache group
        BlockStored(block_hashes=[b"r"], parent_block_hash=None, token_ids=tokens[:4], block_size=BS, lora_id=3,
                    medium="GPU", lora_name="adapter"),
        stored([b"e"], None, tokens[:4], extra_keys=[("salt",)]),
        BlockStored(block_hashes=[b"p"], parent_block_hash=None, token_ids=tokens[:2], block_size=2, lora_id=None,
                    medium="GPU", lora_name=None),  # a partial block (another hash block size)
        BlockStored(block_hashes=[b"o"], parent_block_hash=None, token_ids=tokens[:4], block_size=BS, lora_id=None,
                    medium="CPU", lora_name=None),  # an offloading tier
        stored([b"y"], b"x", tokens[4:]),  # below a skipped block: skipped too
    ])
    assert sink.held() == {} and mapper.num_skipped == 7


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=1), None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def cached_token_blocks(pool: BlockPool, requests: list[Request]) -> set[int]:
    """pdserve hashes of the full blocks of these requests that vLLM's cache holds now."""
    held = set()
    for r in requests:
        ours = block_hashes(r.all_token_ids, BS)
        for k, theirs in enumerate(r.block_hashes):
            if pool.get_cached_block(theirs, [0]) is not None:
                held.add(ours[k])
    return held


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_vllm_block_pool_events_over_its_zmq_publisher_give_the_cached_blocks(tmp_path):
    init_none_hash(sha256)
    endpoint = f"ipc://{tmp_path}/kv-events.sock"
    sink = Sink()
    subscriber = VllmKVEventSubscriber(endpoint, VllmKVEventMapper(sink, BS))
    subscriber.start()  # before the publisher binds, as the engine does
    publisher = ZmqEventPublisher(0, endpoint=endpoint, topic=TOPIC)
    pool = BlockPool(num_gpu_blocks=9, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)

    def publish() -> None:
        publisher.publish(KVEventBatch(ts=time.time(), events=pool.take_events()))

    try:
        await asyncio.sleep(0.2)  # let the SUB connect (ZMQ's slow joiner): a real engine starts for seconds
        first = make_request("r1", list(range(14)))  # 3 full blocks and 2 tokens
        blocks = pool.get_new_blocks(4)
        pool.cache_full_blocks(first, blocks, 0, 3, BS, 0)
        pool.free_blocks(reversed(blocks))  # finished: cached, evictable, tail first
        publish()
        await wait_until(lambda: set(sink.held()) == cached_token_blocks(pool, [first]) and sink.held())

        # Same first two blocks, then others: vLLM reports the new blocks under its parent's hash.
        second = make_request("r2", list(range(8)) + [90 + t for t in range(8)])
        hits = [pool.get_cached_block(h, [0])[0] for h in second.block_hashes[:2]]
        pool.touch(hits)
        fresh = pool.get_new_blocks(2)
        pool.cache_full_blocks(second, hits + fresh, 2, 4, BS, 0)
        publish()
        await wait_until(lambda: set(sink.held()) == cached_token_blocks(pool, [first, second]))
        assert len(sink.held()) == 5

        # A third prompt needs more blocks than are free: vLLM evicts cached ones and says so.
        pool.free_blocks(reversed(hits + fresh))
        third = make_request("r3", [200 + t for t in range(24)])
        blocks = pool.get_new_blocks(6)
        pool.cache_full_blocks(third, blocks, 0, 6, BS, 0)
        publish()
        await wait_until(lambda: set(sink.held()) == cached_token_blocks(pool, [first, second, third]))
        assert set(block_hashes(third.all_token_ids, BS)) <= set(sink.held()) and len(sink.held()) < 11

        pool.free_blocks(blocks)
        assert pool.reset_prefix_cache()  # AllBlocksCleared
        publish()
        await wait_until(lambda: sink.held() == {})
        assert subscriber.num_gaps == 0
    finally:
        publisher.shutdown()
        await subscriber.stop()


async def test_a_lost_batch_resets_the_mapping(tmp_path):
    endpoint = f"ipc://{tmp_path}/kv-events.sock"
    sink = Sink()
    subscriber = VllmKVEventSubscriber(endpoint, VllmKVEventMapper(sink, BS))
    subscriber.start()
    publisher = ZmqEventPublisher(0, endpoint=endpoint, topic=TOPIC)
    try:
        await asyncio.sleep(0.2)
        tokens = list(range(8))
        publisher.publish(KVEventBatch(ts=time.time(), events=[stored([b"a"], None, tokens[:4])]))
        await wait_until(lambda: len(sink.held()) == 1)
        next(publisher._seq_gen)  # the publisher skips a seq, as if its PUB socket had dropped a batch
        publisher.publish(KVEventBatch(ts=time.time(), events=[stored([b"b"], b"a", tokens[4:])]))
        await wait_until(lambda: subscriber.num_gaps == 1)
        # The mapping was reset: b's parent is unknown now, so nothing is claimed.
        assert sink.held() == {} and subscriber.mapper.num_resets == 1
    finally:
        publisher.shutdown()
        await subscriber.stop()


async def test_the_engine_config_makes_vllm_publish_to_the_engines_own_subscriber(tmp_path):
    """VllmEngine's kv_events_config, given to vLLM's own publisher factory (what its scheduler does), reaches
    the subscriber the engine started; the engine arguments accept it. No engine starts."""
    from vllm.distributed.kv_events import EventPublisherFactory
    from vllm.engine.arg_utils import AsyncEngineArgs

    sink = Sink()
    engine = vllm_engine(prefix_caching=True, kv_events=sink)  # never started: only its KV event plumbing is used
    engine._kv_events_path = str(tmp_path / "kv-events.sock")
    config = engine._kv_events_config()
    publisher = None
    try:
        assert config.enable_kv_cache_events and config.publisher == "zmq" and config.topic == TOPIC
        assert config.endpoint == f"ipc://{tmp_path}/kv-events.sock"
        AsyncEngineArgs(model="unused", enable_prefix_caching=True, kv_events_config=config)
        publisher = EventPublisherFactory.create(config, 0)
        await asyncio.sleep(0.2)
        tokens = list(range(8))
        publisher.publish(KVEventBatch(ts=time.time(), events=[stored([b"a", b"b"], None, tokens)]))
        await wait_until(lambda: set(sink.held()) == set(block_hashes(tokens, BS)))
    finally:
        if publisher is not None:
            publisher.shutdown()
        await engine._kv_event_subscriber.stop()


def test_without_prefix_caching_vllm_publishes_nothing():
    assert vllm_engine(prefix_caching=False, kv_events=Sink())._kv_events_config() is None


def vllm_engine(*, prefix_caching: bool, kv_events: Sink):
    """A VllmEngine built as the factory builds it, with a made-up card; constructing one starts nothing."""
    from pathlib import Path

    from pdserve.engine.vllm_engine import VllmEngine, VllmEngineConfig
    from pdserve.protocol import KVLayout, ModelCard

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", dtype_bytes=4, block_size=BS)
    card = ModelCard(name="m", tokenizer="unused", max_model_len=64, kv_layout=layout)
    return VllmEngine(VllmEngineConfig(
        worker_id="kv-events-test", model_path=Path("unused"), card=card, advertise_host="127.0.0.1",
        bind_host="127.0.0.1", kv_lease_s=30.0, kv_pull_timeout_s=1.0, kv_connect_timeout_s=1.0,
        prefix_caching=prefix_caching),
        kv_events=kv_events)


def test_a_tier_store_after_a_clear_moves_before_it_unless_vllm_cached_the_block_again_in_between():
    from pdserve.kv.vllm_events import _tier_stores_in_order

    def tier(hashes):
        return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=list(range(BS * len(hashes))),
                           block_size=BS, lora_id=None, medium="CPU", lora_name=None)

    clear, clear2, k, j = AllBlocksCleared(), AllBlocksCleared(), stored([b"k"], None, list(range(BS))), tier([b"j"])
    assert _tier_stores_in_order([k, clear, tier_k := tier([b"k"])]) == [k, tier_k, clear]
    assert _tier_stores_in_order([clear, k, tier_k]) == [clear, k, tier_k]  # copied after the reset
    assert _tier_stores_in_order([k, clear, clear2, tier_k, j]) == [k, tier_k, j, clear, clear2]
    assert _tier_stores_in_order([clear, k, clear2, tier_k]) == [clear, k, tier_k, clear2]
