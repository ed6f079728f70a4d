"""KV on a CUDA device served and pulled through pinned host staging; skipped where there is no CUDA."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pdserve.kv.cuda_staging import CudaStagingPool, StagingFull  # noqa: E402
from pdserve.kv import TransferClient, TransferEndpoint  # noqa: E402
from pdserve.kv.vllm_pool import make_kv_block_pool  # noqa: E402
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches  # noqa: E402


def host_bytes(t) -> bytes:
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def test_stage_out_copies_device_blocks_to_host_views():
    caches = gpu_caches(0)
    pool = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    assert isinstance(pool, CudaStagingPool) and sum(pool.segment_nbytes) == LAYOUT.bytes_per_block
    pool.stage_out([5, 9])
    k0, v0 = caches["model.layers.0.self_attn.attn"][0], caches["model.layers.0.self_attn.attn"][1]
    assert bytes(pool.segments(9)[0]) == host_bytes(k0[9]) and bytes(pool.segments(9)[1]) == host_bytes(v0[9])
    with pytest.raises(IndexError, match="not staged"):
        pool.segments(6)
    pool.stage_out([9])  # shared by a second transfer: one slot, two references
    pool.unstage([5, 9])
    assert pool.num_staged_blocks == 1
    pool.unstage([9])
    assert pool.num_staged_blocks == 0


def test_stage_in_commit_writes_host_slots_to_the_device():
    caches = gpu_caches(1)
    pool = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    pool.stage_in_begin([3])
    for seg in pool.segments(3):
        seg[:] = b"\x01" * seg.nbytes
    pool.stage_in_commit([3])
    pool.unstage([3])
    for tensor in caches.values():
        assert torch.equal(tensor[:, 3].contiguous().view(torch.uint8), torch.ones_like(tensor[:, 3].view(torch.uint8)))


def test_blocks_in_scattered_slots_copy_both_ways():
    caches = gpu_caches(5)
    pool = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    pool.stage_out(list(range(10)))
    pool.unstage([2, 3, 7])  # free slots 2, 3 and 7: the next blocks land in three runs
    pool.stage_out([40, 41, 42, 43])
    layer = caches["model.layers.3.self_attn.attn"]
    for b in (40, 41, 42, 43, 9):
        assert bytes(pool.segments(b)[7]) == host_bytes(layer[1, b])
    pool.unstage([0, 1, 4, 5, 6, 8, 9, 40, 41, 42, 43])
    pool.stage_out([0, 1, 4])
    pool.stage_in_begin([50, 51, 52, 53])
    for b in (50, 51, 52, 53):
        for seg in pool.segments(b):
            seg[:] = bytes([b]) * seg.nbytes
    pool.stage_in_commit([50, 51, 52, 53])
    for b in (50, 51, 52, 53):
        assert torch.all(layer[:, b].contiguous().view(torch.uint8) == b)
    assert bytes(pool.segments(4)[0]) == host_bytes(caches["model.layers.0.self_attn.attn"][0, 4])


def test_a_full_staging_buffer_is_a_clear_error():
    pool = make_kv_block_pool(gpu_caches(2), NUM_BLOCKS, "m", LAYOUT)
    small = CudaStagingPool([pool._device[0]], max_staging_bytes=2 * pool.segment_nbytes[0])
    small.stage_out([0, 1])
    with pytest.raises(StagingFull, match="0 of 2 pinned staging slots free"):
        small.stage_out([2])


def test_pull_between_two_gpu_pools():
    source, target = gpu_caches(3), gpu_caches(4)
    src = make_kv_block_pool(source, NUM_BLOCKS, "m", LAYOUT)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    remote, local = list(range(10, 42)), list(range(20, 52))
    endpoint = TransferEndpoint(src, bind_host="127.0.0.1")
    endpoint.start()
    client = TransferClient()
    try:
        src.stage_out(remote)
        endpoint.allow("t", "secret", remote, expires_at=1e12)
        dst.stage_in_begin(local)
        result = asyncio.run(client.pull(endpoint.address, "t", "secret", remote, dst, local, timeout_s=30))
        dst.stage_in_commit(local)
    finally:
        client.close()
        endpoint.stop()
    assert result.num_blocks == len(remote)
    for name in source:
        assert torch.equal(source[name][:, remote], target[name][:, local])
