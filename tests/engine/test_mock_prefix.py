"""The mock engine's part in prefix reuse (engine/mock_prefix.py), two engines in one process over real sockets:
a lease pins the cached leading blocks and opens them to one pull; the other engine loads them instead of computing
them and its first token is the one computing gives; a lease of blocks that are gone holds nothing, and the index
is told to forget them; a released lease unpins its blocks."""

from __future__ import annotations

import pytest

from pdserve.engine.base import prefix_lease_id
from pdserve.kv.hashing import block_hashes
from tests.engine.test_mock_kv_events import LAYOUT, PROMPT, SAMPLING, Sink, make_engine

LEASE_S = 5.0


class RecordingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.absent_hashes: list[int] = []

    def absent(self, block_hashes):
        self.absent_hashes.extend(block_hashes)


@pytest.fixture
async def peers():
    holder, loader = make_engine("holder", prefix_caching=True), make_engine("loader", prefix_caching=True)
    holder.kv_events = RecordingSink()
    for engine in (holder, loader):
        await engine.start()
    try:
        yield holder, loader
    finally:
        for engine in (holder, loader):
            await engine.stop()


def full_block_hashes(prompt) -> tuple[int, ...]:
    return tuple(block_hashes(prompt, LAYOUT.block_size)[:len(prompt) // LAYOUT.block_size])


async def test_a_leased_prefix_is_loaded_instead_of_computed(peers):
    holder, loader = peers
    cached = await holder.prefill("r1", PROMPT, SAMPLING, LEASE_S)
    await holder.release_kv("r1")  # its full blocks stay in the holder's prefix cache
    hashes = full_block_hashes(PROMPT)

    lease = await holder.lease_prefix(prefix_lease_id("r2"), hashes, LEASE_S)
    assert lease is not None and len(lease.block_ids) == len(hashes) == 4
    assert holder.stats()["num_held_blocks"] == 4  # pinned while leased

    result = await loader.prefill("r2", PROMPT, SAMPLING, LEASE_S, prefix_kv=lease)
    assert result.first_token_id == cached.first_token_id
    # 4 full blocks of 16 tokens loaded: 64 of the 69 prompt tokens (the rest, and the last, computed)
    assert result.num_peer_loaded_tokens == 64 and result.num_peer_loaded_bytes == 4 * LAYOUT.bytes_per_block
    assert loader.stats()["num_prefix_peer_loaded_tokens"] == 64

    assert await holder.release_kv(prefix_lease_id("r2"))
    assert holder.stats()["num_held_blocks"] == 0
    assert not holder.kv_events.absent_hashes


async def test_a_lease_of_blocks_that_are_gone_holds_nothing_and_the_index_forgets_them(peers):
    holder, _ = peers
    hashes = full_block_hashes(PROMPT)
    assert await holder.lease_prefix(prefix_lease_id("r3"), hashes, LEASE_S) is None
    assert holder.kv_events.absent_hashes == list(hashes)
    assert holder.stats()["num_held_blocks"] == 0


async def test_a_prefix_pull_that_fails_is_computed(peers):
    holder, loader = peers
    await holder.prefill("r4", PROMPT, SAMPLING, LEASE_S)
    await holder.release_kv("r4")
    lease = await holder.lease_prefix(prefix_lease_id("r5"), full_block_hashes(PROMPT), LEASE_S)
    await holder.release_kv(prefix_lease_id("r5"))  # released before the pull: the endpoint refuses it
    result = await loader.prefill("r5", PROMPT, SAMPLING, LEASE_S, prefix_kv=lease)
    assert result.num_peer_loaded_tokens == 0
    assert loader.stats()["num_prefix_peer_load_failures"] == 1


async def test_a_decode_engine_prefilling_locally_loads_a_leased_prefix(peers):
    holder, loader = peers
    cached = await holder.prefill("r6", PROMPT, SAMPLING, LEASE_S)
    await holder.release_kv("r6")
    lease = await holder.lease_prefix(prefix_lease_id("r7"), full_block_hashes(PROMPT), LEASE_S)
    outputs = [out async for out in loader.generate("r7", PROMPT, SAMPLING, None, None, prefix_kv=lease)]
    assert outputs[0].token_ids == (cached.first_token_id,)  # the first token, as computing the prompt gives
    assert loader.stats()["num_prefix_peer_loaded_tokens"] == 64
    assert loader.stats()["num_computed_prompt_tokens"] == len(PROMPT) - 64
    assert await holder.release_kv(prefix_lease_id("r7"))
    assert holder.stats()["num_held_blocks"] == 0 and loader.stats()["num_held_blocks"] == 0
