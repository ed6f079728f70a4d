"""KV on a GPU, moved the way pdserve moves it: device -> pinned host -> ZeroMQ -> pinned host -> device.

Tensors are in vLLM's CUDA (flash-attention) layout, one [2, num_blocks, block_size, kv_heads, head_dim]
tensor per layer, Llama-3-8B-shaped by default (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks:
2 MiB per block). A scattered set of blocks moves from a "prefill" pool to other block ids of a "decode"
pool, every stage timed separately and the result checked on the device. Needs CUDA; prints a table.

    python benchmarks/cuda_kv_transfer.py [--blocks 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import torch

from pdserve.kv import TransferClient, TransferEndpoint
from pdserve.kv.vllm_pool import make_kv_block_pool
from pdserve.protocol import KVLayout


def caches(num_blocks: int, layout: KVLayout, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
            for i in range(layout.num_layers)}


def prefill_side(conn, num_blocks: int, layout: KVLayout) -> None:
    """The prefill process: owns the source KV and the endpoint; stages blocks out when asked."""
    pool = make_kv_block_pool(caches(num_blocks, layout, 1), num_blocks, "llama3-8b", layout)
    endpoint = TransferEndpoint(pool, bind_host="127.0.0.1")
    endpoint.start()
    conn.send(endpoint.address)
    try:
        while (msg := conn.recv()) is not None:
            op, transfer_id, block_ids = msg
            if op == "stage":
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pool.stage_out(block_ids)
                seconds = time.perf_counter() - t0
                endpoint.allow(transfer_id, "secret", block_ids, expires_at=time.time() + 60)
                conn.send(seconds)
            else:
                endpoint.release(transfer_id)
                pool.unstage(block_ids)
                conn.send(None)
    finally:
        endpoint.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32, help="blocks per transfer (2 MiB each by default)")
    parser.add_argument("--pool-blocks", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", dtype_bytes=2, block_size=16)
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=prefill_side, args=(child_conn, args.pool_blocks, layout), daemon=True)
    child.start()
    address = conn.recv()
    source = caches(args.pool_blocks, layout, 1)  # the same seed as the prefill side: the expected bytes
    target = caches(args.pool_blocks, layout, 2)
    dst = make_kv_block_pool(target, args.pool_blocks, "llama3-8b", layout)
    client = TransferClient()
    nbytes = args.blocks * layout.bytes_per_block
    rows: dict[str, list[float]] = {"stage out (D2H)": [], "transport": [], "stage in (H2D)": [], "end to end": []}
    g = torch.Generator().manual_seed(0)
    try:
        for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
            perm = torch.randperm(args.pool_blocks, generator=g).tolist()
            remote, local = perm[: args.blocks], perm[args.blocks: 2 * args.blocks]
            t0 = time.perf_counter()
            conn.send(("stage", f"t{rep}", remote))
            stage_out_s = conn.recv()
            t1 = time.perf_counter()
            dst.stage_in_begin(local)
            result = asyncio.run(client.pull(address, f"t{rep}", "secret", remote, dst, local, timeout_s=60))
            t2 = time.perf_counter()
            dst.stage_in_commit(local)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            conn.send(("release", f"t{rep}", remote))
            conn.recv()
            dst.unstage(local)
            assert result.num_bytes == nbytes
            for name in source:
                assert torch.equal(source[name][:, remote], target[name][:, local]), f"{name}: bytes differ"
            if rep:
                for key, seconds in zip(rows, (stage_out_s, t2 - t1, t3 - t2, t3 - t0)):
                    rows[key].append(nbytes / seconds / 1e9)
    finally:
        client.close()
        conn.send(None)
        child.join(timeout=30)
    print(f"{torch.cuda.get_device_name()}: {args.blocks} blocks x {layout.bytes_per_block} B = {nbytes / 2**20:.0f} MiB "
          f"per transfer, {layout.num_layers} layers x K,V segments per block, prefill endpoint in its own process, "
          f"{args.reps} reps, bytes verified on the device")
    print(f"{'stage':18} {'best GB/s':>10} {'median GB/s':>12} {'median ms':>10}")
    for key, gbps in rows.items():
        print(f"{key:18} {max(gbps):10.2f} {statistics.median(gbps):12.2f} {nbytes / statistics.median(gbps) / 1e6:10.2f}")


if __name__ == "__main__":
    main()
