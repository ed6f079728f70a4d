"""KV on a CUDA device served and pulled through pinned host staging; skipped where there is no CUDA.

Staging is lazy and pipelined: nothing is copied to the host until a pull over a host path asks, the sender
waits for each segment's copy only before sending it, and the receiver moves each segment on to the device as
it arrives (stage_in_commit then copies nothing twice)."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pdserve.kv.cuda_staging import CudaStagingPool, StagingFull  # noqa: E402
from pdserve.kv import TransferClient, TransferEndpoint, TransferIntegrityError  # noqa: E402
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


@pytest.mark.parametrize("copies", ["kernel", "torch"])
@pytest.mark.parametrize("ids", ["consecutive", "scattered"])
def test_pull_between_two_gpu_pools(copies, ids):
    source, target = gpu_caches(3), gpu_caches(4)
    src = make_kv_block_pool(source, NUM_BLOCKS, "m", LAYOUT)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    if copies == "torch":  # the fallback where the copy kernel cannot run
        src = CudaStagingPool(src.device_segments, src.layout_tag, copy_kernel=False)
        dst = CudaStagingPool(dst.device_segments, dst.layout_tag, copy_kernel=False)
    remote, local = list(range(10, 42)), list(range(20, 52))
    if ids == "scattered":
        remote, local = remote[::-1], [b * 7 % NUM_BLOCKS for b in range(1, 33)]
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
    nbytes = len(remote) * LAYOUT.bytes_per_block
    assert src.num_bytes_to_host == nbytes  # copied once, when the pull asked
    assert dst.num_bytes_to_device == nbytes  # segment by segment during the pull; stage_in_commit added nothing


def test_nothing_is_copied_to_the_host_until_a_pull_asks():
    """stage_out at allow reserves slots; a transfer pulled device to device (cuda-ipc) never pays the copy. The
    bytes a host pull gets are the KV as it was when stage_out was called on its stream (the produced event),
    even when the pull comes later."""
    caches = gpu_caches(6)
    pool = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    layer = caches["model.layers.1.self_attn.attn"]
    pool.stage_out([7, 8])
    assert pool.num_bytes_to_host == 0
    expected = host_bytes(layer[0, 8])
    assert bytes(pool.segments(8)[2]) == expected  # a reader of the slot waits for its copy
    assert pool.num_bytes_to_host == LAYOUT.bytes_per_block  # that block's, no more
    pool.unstage([7, 8])


def test_segments_sent_and_committed_one_by_one():
    """The sender's wait and the receiver's commit, segment by segment, as the transport drives them."""
    caches, target = gpu_caches(7), gpu_caches(8)
    src = make_kv_block_pool(caches, NUM_BLOCKS, "m", LAYOUT)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    remote, local = [3, 9, 10, 11], [30, 31, 40, 41]
    src.stage_out(remote)
    dst.stage_in_begin(local)
    for k in range(len(src.segment_nbytes)):
        src.wait_out_segment(remote, k)
        for r, l in zip(remote, local):
            dst.segments(l)[k][:] = src.segments(r)[k]
        dst.commit_segment(local, k)
        dst.commit_segment(local, k)  # twice: the second is a no-op
    assert dst.num_bytes_to_device == len(local) * LAYOUT.bytes_per_block  # the last segment flushed the rest
    dst.stage_in_commit(local)
    assert dst.num_bytes_to_device == len(local) * LAYOUT.bytes_per_block
    for name in caches:
        assert torch.equal(caches[name][:, remote], target[name][:, local])
    src.unstage(remote)
    dst.unstage(local)


def test_a_corrupted_staged_pull_fails_and_its_slots_come_back():
    source, target = gpu_caches(9), gpu_caches(10)
    src = make_kv_block_pool(source, NUM_BLOCKS, "m", LAYOUT)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    remote, local = list(range(0, 8)), list(range(8, 16))
    endpoint = TransferEndpoint(src, bind_host="127.0.0.1")
    endpoint.start()
    client = TransferClient()
    try:
        src.stage_out(remote)
        endpoint.allow("t", "secret", remote, expires_at=1e12)
        endpoint._corrupt_next_send_for_tests()
        dst.stage_in_begin(local)
        with pytest.raises(TransferIntegrityError):
            asyncio.run(client.pull(endpoint.address, "t", "secret", remote, dst, local, timeout_s=30))
        dst.unstage(local)  # waits for the segments already moved on to the device
        assert dst.num_staged_blocks == 0
    finally:
        client.close()
        endpoint.stop()
