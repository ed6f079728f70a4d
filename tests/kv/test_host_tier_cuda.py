"""The vLLM host tier's worker half on GPU KV (kv.connector_host_tier.HostTierStore over a CudaStagingPool, what
pdserve's connector makes of vLLM's CUDA KV tensors): blocks saved into pinned host rows come back byte for byte
into other blocks after their own were overwritten. Skipped where there is no CUDA; the scheduler half and the CPU
path: tests/kv/test_connector_host_tier.py and tests/vllm/test_prefix_reuse.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pdserve.kv.connector_host_tier import HostTierStore  # noqa: E402
from pdserve.kv.cuda_staging import CudaStagingPool  # noqa: E402
from pdserve.kv.vllm_pool import make_kv_block_pool  # noqa: E402
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches  # noqa: E402


def block_bytes(pool: CudaStagingPool, block_id: int) -> bytes:
    return b"".join(seg[block_id].cpu().numpy().tobytes() for seg in pool.device_segments)


def test_gpu_blocks_saved_to_pinned_rows_come_back_into_other_blocks():
    pool = make_kv_block_pool(gpu_caches(0), NUM_BLOCKS, "m", LAYOUT)
    assert isinstance(pool, CudaStagingPool)
    store = HostTierStore(4, LAYOUT.bytes_per_block, pinned=True)
    assert store.rows.shape == (4, LAYOUT.bytes_per_block)
    saved, slots, others = [7, 2, 11], [3, 0, 1], [4, 9, 5]
    before = [block_bytes(pool, b) for b in saved]
    assert len(set(before)) == 3 and all(block_bytes(pool, b) != before[0] for b in others)
    store.copy(pool, list(zip(saved, slots)), [])
    assert [store.rows[s].tobytes() for s in slots] == before
    for seg in pool.device_segments:  # vLLM reuses the blocks
        seg[saved] = 0
    store.copy(pool, [], list(zip(slots, others)))
    torch.cuda.current_stream().synchronize()
    assert [block_bytes(pool, b) for b in others] == before
    assert all(set(block_bytes(pool, b)) == {0} for b in saved)


def test_a_save_and_a_load_of_one_step_save_first():
    """A block freed at a request's end and reallocated in the next step is saved before the step's load lands in
    it (connector_host_tier: the worker half makes a step's saves first)."""
    pool = make_kv_block_pool(gpu_caches(1), NUM_BLOCKS, "m", LAYOUT)
    store = HostTierStore(2, LAYOUT.bytes_per_block, pinned=True)
    store.copy(pool, [(3, 0)], [])
    first = block_bytes(pool, 3)
    old = block_bytes(pool, 6)
    store.copy(pool, [(6, 1)], [(0, 6)])  # block 6 saved into slot 1, then slot 0 (block 3's bytes) loaded into it
    torch.cuda.current_stream().synchronize()
    assert store.rows[1].tobytes() == old and block_bytes(pool, 6) == first
