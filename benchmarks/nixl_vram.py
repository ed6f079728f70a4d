"""NIXL VRAM -> VRAM between two processes on one GPU machine, against a device-to-device copy of the same bytes.

What the issue asks of the GPU machine for the nixl path (not CI): a prefill process holds KV in GPU memory,
registered with its NIXL agent (UCX backend); a decode process READs it into its own GPU memory. Side by side, in
one run, interleaved repetition by repetition:

  device_copy : the same number of bytes copied device to device inside the decode process (torch copy_), the
                ceiling of a same-GPU move.
  nixl/1desc  : one NIXL READ of the whole payload, one descriptor (contiguous KV).
  nixl/scatter: one NIXL READ of the payload as SEGMENT_KIB pieces at scattered offsets on both sides, as vLLM's
                paged KV of many layers looks (64 MiB of it = 2,048 pieces of 32 KiB).

Every variant's bytes are checked (the destination equals the source, on the GPU) on the first and last
repetition. UCX picks its transports; the script prints UCX_TLS and NIXL's version. On a GPU without NVLink peers
(one-GPU machines) UCX 1.23 turns cuda_ipc's zero-copy GET off and emulates READs over TCP (measured: 0.5 GB/s):
set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y to measure cuda_ipc. Needs torch with CUDA and a nixl wheel (nixl-cu12 /
nixl-cu13, with the `nixl` package that imports it).

Prints `ratio nixl/device_copy` (one descriptor) and `ratio nixl_scatter/device_copy`, ratios of medians. --out FILE.json writes all figures.
Usage: python benchmarks/nixl_vram.py [--payload-mib 64] [--reps 9] [--segment-kib 32] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time

SEED = 1234


def source_bytes(nbytes: int, device: str):
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(SEED)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)


def scatter_offsets(nbytes: int, piece: int, seed: int) -> list[int]:
    import random

    offsets = list(range(0, nbytes, piece))
    random.Random(seed).shuffle(offsets)
    return offsets


def nixl_api():
    """NIXL's Python API: the `nixl` shim where the meta package is installed, else a build under its own name."""
    import importlib

    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit("no NIXL here: pip install nixl-cu13 (or nixl-cu12)")


def serve(conn, nbytes: int) -> None:
    """The prefill process: KV in VRAM, registered once; answers until told to stop."""
    import torch

    api = nixl_api()
    nixl_agent, nixl_agent_config = api.nixl_agent, api.nixl_agent_config

    src = source_bytes(nbytes, "cuda:0")
    torch.cuda.synchronize()
    agent = nixl_agent(f"vram-prefill-{os.getpid()}", nixl_agent_config(backends=["UCX"]))
    registered = agent.register_memory([(src.data_ptr(), nbytes, 0, "")], "VRAM")
    conn.send((agent.get_agent_metadata(), src.data_ptr()))
    conn.recv()
    agent.deregister_memory(registered)


def read(agent, name: str, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
    handle = agent.initialize_xfer("READ", agent.get_xfer_descs([(a, n, 0) for a, n in local], "VRAM"),
                                   agent.get_xfer_descs([(a, n, 0) for a, n in remote], "VRAM"), name)
    if agent.transfer(handle) == "ERR":
        raise RuntimeError("NIXL could not post the READ")
    deadline = time.monotonic() + 60
    while (state := agent.check_xfer_state(handle)) == "PROC":
        if time.monotonic() > deadline:
            raise TimeoutError("NIXL READ not done within 60 s")
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL READ ended {state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--segment-kib", type=int, default=32)
    parser.add_argument("--out", metavar="FILE.json")
    args = parser.parse_args()

    import torch

    api = nixl_api()
    nixl_agent, nixl_agent_config = api.nixl_agent, api.nixl_agent_config
    nbytes, piece = args.payload_mib << 20, args.segment_kib << 10
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, nbytes), daemon=True)
    proc.start()
    metadata, remote_base = parent.recv()

    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
    replica = source_bytes(nbytes, "cuda:0")  # the source's bytes, here: device_copy's source and the check
    agent = nixl_agent(f"vram-decode-{os.getpid()}", nixl_agent_config(backends=["UCX"]))
    registered = agent.register_memory([(dst.data_ptr(), nbytes, 0, "")], "VRAM")
    name = agent.add_remote_agent(metadata)
    local_offsets, remote_offsets = scatter_offsets(nbytes, piece, 1), scatter_offsets(nbytes, piece, 2)
    scatter_local = [(dst.data_ptr() + o, piece) for o in local_offsets]
    scatter_remote = [(remote_base + o, piece) for o in remote_offsets]

    def check_scatter() -> bool:
        want = torch.empty_like(dst)
        lo = torch.tensor(local_offsets, device="cuda:0") // piece
        ro = torch.tensor(remote_offsets, device="cuda:0") // piece
        want.view(-1, piece)[lo] = replica.view(-1, piece)[ro]
        return bool(torch.equal(dst, want))

    variants = {
        "device_copy": (lambda: (dst.copy_(replica), torch.cuda.synchronize()), lambda: torch.equal(dst, replica)),
        "nixl/1desc": (lambda: read(agent, name, [(dst.data_ptr(), nbytes)], [(remote_base, nbytes)]),
                       lambda: torch.equal(dst, replica)),
        "nixl/scatter": (lambda: read(agent, name, scatter_local, scatter_remote), check_scatter),
    }
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    rounds = args.warmup + args.reps
    try:
        for rep in range(rounds):
            for label, (run, check) in variants.items():
                dst.zero_()
                torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                if rep in (0, rounds - 1) and not check():
                    raise RuntimeError(f"{label} delivered wrong bytes")
                if rep >= args.warmup:
                    seconds[label].append(elapsed)
    finally:
        agent.deregister_memory(registered)
        parent.send("stop")
        proc.join(timeout=30)

    figures = {k: dict(median_s=statistics.median(v), median_gbps=nbytes / statistics.median(v) / 1e9,
                       best_gbps=nbytes / min(v) / 1e9) for k, v in seconds.items()}
    try:
        from importlib.metadata import version
        nixl_version = next(version(d) for d in ("nixl-cu13", "nixl-cu12", "nixl") if _installed(d))
    except StopIteration:
        nixl_version = "?"
    print(f"# {torch.cuda.get_device_name(0)}; payload {args.payload_mib} MiB; {args.reps} reps after {args.warmup} "
          f"warm-up; scatter pieces {args.segment_kib} KiB; nixl {nixl_version}; "
          f"UCX_TLS={os.environ.get('UCX_TLS', 'default')}")
    for label, f in figures.items():
        print(f"{label:<14} median {f['median_gbps']:9.1f} GB/s  best {f['best_gbps']:9.1f} GB/s  "
              f"({f['median_s'] * 1e6:.0f} us)")
    copy_gbps = figures["device_copy"]["median_gbps"]
    ratios = {"nixl/device_copy": figures["nixl/1desc"]["median_gbps"] / copy_gbps,
              "nixl_scatter/device_copy": figures["nixl/scatter"]["median_gbps"] / copy_gbps}
    for k, v in ratios.items():
        print(f"ratio {k} {v:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="nixl-vram", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           device=torch.cuda.get_device_name(0), platform=platform.platform(), nixl=nixl_version,
                           ucx_tls=os.environ.get("UCX_TLS", "default"), payload_mib=args.payload_mib,
                           segment_kib=args.segment_kib, reps=args.reps, figures=figures, ratios=ratios), f, indent=2)
            f.write("\n")


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
