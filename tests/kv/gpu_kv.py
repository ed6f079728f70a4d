"""GPU KV for the CUDA tests: vLLM's flash-attention layout, small (callers skip where there is no CUDA)."""

from __future__ import annotations

from pdserve.protocol import KVLayout

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, LAYERS = 64, 16, 8, 128, 4
LAYOUT = KVLayout(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16", dtype_bytes=2,
                  block_size=BLOCK_SIZE)


def gpu_caches(seed: int) -> dict:
    """[2, num_blocks, block_size, num_kv_heads, head_dim] per layer, random (bf16) from `seed`."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM,
                                                            generator=g, device="cuda", dtype=torch.bfloat16)
            for i in range(LAYERS)}
