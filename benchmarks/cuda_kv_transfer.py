"""KV on a GPU, moved the ways pdserve moves it, beside what the device can do with the same bytes.

Tensors are in vLLM's CUDA (flash-attention) layout, one [2, num_blocks, block_size, kv_heads, head_dim]
tensor per layer, Llama-3-8B-shaped by default (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks:
2 MiB per block, 64 segments of 32 KiB). A scattered set of blocks moves from a "prefill" pool, in a process of
its own, to other block ids of a "decode" pool, every result checked on the device:

  staged     : the path between hosts: device -> pinned host -> ZeroMQ/TCP -> pinned host -> device, pipelined
               segment by segment (the prefill side copies segment k+1 to the host while segment k is sent; the
               decode side moves each segment to the device as it arrives), timed end to end (allow included)
  raw_socket : the same number of bytes from pinned host memory to pinned host memory over one TCP connection
               between the two processes (sendall / recv_into of 1 MiB chunks): the ceiling of the staged path
  pinned D2H / H2D: one contiguous copy of the same bytes each way, in this process: the staging stages' ceiling
  cuda_ipc   : one whole pull over the cuda-ipc path (IPC handles opened at the first pull, one copy kernel
               over a table of segment addresses, the endpoint's confirmation), timed around pull()
  cuda_ipc_kernel: the copy kernel alone over the same table shape, in this process
  nixl       : one whole pull over the nixl path from GPU KV (kv/nixl_path.py: the prefill side's KV registered as
               VRAM, READ in 64 MiB batches into landing buffers on the decode side's GPU, copied into the blocks by
               the copy kernel, the endpoint's confirmation), timed around pull(); UCX's transports as --ucx-tls
               says (default: UCX's own choice, cuda_ipc on one host; tcp,cuda_copy: through host memory over TCP,
               as between hosts without RDMA NICs). Where NIXL loads (a nixl-cu13 wheel).
  device_copy: one contiguous device-to-device copy of the same number of bytes: the ceiling

Needs CUDA. Ends with `ratio <path>/<reference> <value>` lines (medians).

    python benchmarks/cuda_kv_transfer.py [--blocks 32] [--reps 5] [--ucx-tls tcp,cuda_copy] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import socket
import statistics
import threading
import time

import os

import torch

from pdserve.kv import TransferClient, TransferEndpoint, nixl_path
from pdserve.kv.cuda_ipc import copy, copy_table, launch
from pdserve.kv.vllm_pool import make_kv_block_pool
from pdserve.protocol import KVLayout


def caches(num_blocks: int, layout: KVLayout, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
            for i in range(layout.num_layers)}


def raw_sender(listener: socket.socket, nbytes: int) -> None:
    """One connection; for every byte received, `nbytes` from pinned host memory in 1 MiB sendall()s."""
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    peer, _ = listener.accept()
    with peer:
        while peer.recv(1):
            view = memoryview(source)
            for offset in range(0, nbytes, 1 << 20):
                peer.sendall(view[offset:offset + (1 << 20)])


def raw_receive(sock: socket.socket, target) -> float:
    """Seconds from asking to the last of target's bytes received into it."""
    view, got = memoryview(target), 0
    t0 = time.perf_counter()
    sock.sendall(b"g")
    while got < len(view):
        n = sock.recv_into(view[got:], min(1 << 20, len(view) - got))
        if n == 0:
            raise ConnectionError("raw sender closed")
        got += n
    return time.perf_counter() - t0


def prefill_side(conn, num_blocks: int, layout: KVLayout, raw_nbytes: int) -> None:
    """The prefill process: owns the source KV, the endpoint and a raw socket sender; stages blocks out (which
    now only reserves host slots: the copies run when a pull asks) and allows them when asked."""
    pool = make_kv_block_pool(caches(num_blocks, layout, 1), num_blocks, "llama3-8b", layout)
    endpoint = TransferEndpoint(pool, bind_host="127.0.0.1", offer_nixl=nixl_path.why_unavailable() is None)
    endpoint.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_sender, args=(listener, raw_nbytes), daemon=True).start()
    conn.send((endpoint.address, endpoint.host_id, endpoint.transports, listener.getsockname()[1]))
    try:
        while (msg := conn.recv()) is not None:
            op, transfer_id, block_ids = msg
            if op == "stage":
                pool.stage_out(block_ids)
                endpoint.allow(transfer_id, "secret", block_ids, expires_at=time.time() + 60)
                conn.send(None)
            elif op == "allow":  # cuda-ipc reads the device tensors: nothing to stage
                endpoint.allow(transfer_id, "secret", block_ids, expires_at=time.time() + 60)
                conn.send(None)
            else:
                endpoint.release(transfer_id)
                if op == "release_staged":
                    pool.unstage(block_ids)
                conn.send(None)
    finally:
        endpoint.stop()


def timed_on_device(fn, reps: int) -> list[float]:
    """Seconds per call of fn, CUDA events around each call."""
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000)
    return out


async def tcp_floor(reps: int) -> float:
    """Median seconds of a 4 KiB pull over tcp from an endpoint in this process: the control-plane floor."""
    import numpy as np

    from pdserve.kv import ArrayBlockPool

    src, dst = ArrayBlockPool([np.ones((2, 4096), np.uint8)], "x"), ArrayBlockPool([np.zeros((2, 4096), np.uint8)], "x")
    endpoint, client = TransferEndpoint(src, bind_host="127.0.0.1"), TransferClient(transport="tcp")
    endpoint.start()
    seconds = []
    try:
        for rep in range(reps + 1):
            endpoint.allow(f"f{rep}", "secret", [0], time.time() + 60)
            t0 = time.perf_counter()
            await client.pull(endpoint.address, f"f{rep}", "secret", [0], dst, [1], timeout_s=10)
            if rep:
                seconds.append(time.perf_counter() - t0)
    finally:
        client.close()
        endpoint.stop()
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32, help="blocks per transfer (2 MiB each by default)")
    parser.add_argument("--pool-blocks", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ucx-tls", default="default", help="UCX_TLS for the nixl variant, both sides (default: "
                        "UCX's own choice)")
    parser.add_argument("--out", metavar="FILE.json", help="also write every figure as JSON")
    args = parser.parse_args()
    if args.ucx_tls != "default":
        os.environ["UCX_TLS"] = args.ucx_tls  # before either side makes its NIXL agent (the child inherits it)
    nixl_why = nixl_path.why_unavailable()
    if nixl_why:
        print(f"nixl variant left out: {nixl_why}")
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", dtype_bytes=2, block_size=16)
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    nbytes = args.blocks * layout.bytes_per_block
    child = ctx.Process(target=prefill_side, args=(child_conn, args.pool_blocks, layout, nbytes), daemon=True)
    child.start()
    address, peer_host, peer_transports, raw_port = conn.recv()
    raw_sock = socket.create_connection(("127.0.0.1", raw_port))
    raw_target = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    source = caches(args.pool_blocks, layout, 1)  # the same seed as the prefill side: the expected bytes
    target = caches(args.pool_blocks, layout, 2)
    dst = make_kv_block_pool(target, args.pool_blocks, "llama3-8b", layout)
    staged_client, ipc_client = TransferClient(transport="tcp"), TransferClient(transport="cuda-ipc")
    nixl_client = TransferClient(transport="nixl") if not nixl_why else None
    rows: dict[str, list[float]] = {"staged: pull (copies overlapped)": [], "staged: commit wait": [],
                                    "staged: end to end": [], "raw_socket": [], "cuda_ipc: whole pull": []}
    g = torch.Generator().manual_seed(0)
    loop = asyncio.new_event_loop()  # one loop for every pull, as in a worker

    def check(remote, local) -> None:
        for name in source:
            assert torch.equal(source[name][:, remote], target[name][:, local]), f"{name}: bytes differ"

    try:
        for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
            perm = torch.randperm(args.pool_blocks, generator=g).tolist()
            remote, local = perm[: args.blocks], perm[args.blocks: 2 * args.blocks]
            raw_s = raw_receive(raw_sock, raw_target)
            t0 = time.perf_counter()
            conn.send(("stage", f"t{rep}", remote))
            conn.recv()
            t1 = time.perf_counter()
            dst.stage_in_begin(local)
            result = loop.run_until_complete(
                staged_client.pull(address, f"t{rep}", "secret", remote, dst, local, timeout_s=60))
            t2 = time.perf_counter()
            dst.stage_in_commit(local)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            conn.send(("release_staged", f"t{rep}", remote))
            conn.recv()
            dst.unstage(local)
            assert result.num_bytes == nbytes and result.transport == "tcp"
            check(remote, local)
            for t in target.values():
                t[:, local] = 0  # so that the next path's result means something
            conn.send(("allow", f"i{rep}", remote))
            conn.recv()
            t4 = time.perf_counter()
            result = loop.run_until_complete(ipc_client.pull(
                address, f"i{rep}", "secret", remote, dst, local, timeout_s=60, peer_host_id=peer_host,
                peer_transports=peer_transports))
            t5 = time.perf_counter()
            conn.send(("release", f"i{rep}", remote))
            conn.recv()
            assert result.transport == "cuda-ipc", result
            check(remote, local)
            if rep:
                for key, seconds in zip(rows, (t2 - t1, t3 - t2, t3 - t0, raw_s, t5 - t4)):
                    rows[key].append(seconds)
            if nixl_client is not None:
                for t in target.values():
                    t[:, local] = 0
                conn.send(("allow", f"n{rep}", remote))
                conn.recv()
                t6 = time.perf_counter()
                result = loop.run_until_complete(nixl_client.pull(
                    address, f"n{rep}", "secret", remote, dst, local, timeout_s=60, peer_host_id=peer_host,
                    peer_transports=peer_transports))
                t7 = time.perf_counter()
                conn.send(("release", f"n{rep}", remote))
                conn.recv()
                assert result.transport == "nixl" and result.landed_on_device, result
                check(remote, local)
                if rep:
                    rows.setdefault("nixl: whole pull", []).append(t7 - t6)
        # What a pull costs besides its bytes: one block, the same path.
        one_block = []
        for rep in range(args.reps + 1):
            conn.send(("allow", f"one{rep}", [rep]))
            conn.recv()
            t0 = time.perf_counter()
            loop.run_until_complete(ipc_client.pull(address, f"one{rep}", "secret", [rep], dst, [rep], timeout_s=60,
                                                    peer_host_id=peer_host, peer_transports=peer_transports))
            if rep:
                one_block.append(time.perf_counter() - t0)
            conn.send(("release", f"one{rep}", [rep]))
            conn.recv()
        tcp_floor_ms = loop.run_until_complete(tcp_floor(args.reps)) * 1000
        # The kernel alone and the ceiling, in this process, over the same bytes and the same table shape.
        segs = dst.device_segments
        src_pool = make_kv_block_pool(source, args.pool_blocks, "llama3-8b", layout)
        table = copy_table([t.data_ptr() for t in src_pool.device_segments],
                           [t.stride(0) for t in src_pool.device_segments],
                           [t.data_ptr() for t in segs], [t.stride(0) for t in segs], [t.shape[1] for t in segs],
                           remote, local)
        copy(table, segs[0].device)  # compiles the kernel
        rows["cuda_ipc_kernel (in-process)"] = timed_on_device(lambda: copy(table, segs[0].device), args.reps)
        check(remote, local)
        for chunk_kib in (16, 32, 64, 128):  # the kernel alone, its table already on the device
            t = copy_table([t.data_ptr() for t in src_pool.device_segments],
                           [t.stride(0) for t in src_pool.device_segments], [t.data_ptr() for t in segs],
                           [t.stride(0) for t in segs], [t.shape[1] for t in segs], remote, local,
                           chunk_nbytes=chunk_kib << 10)
            on_device = torch.from_numpy(t).to(segs[0].device)
            launch(on_device, chunk_kib << 10)
            rows[f"kernel only, {chunk_kib} KiB chunks"] = timed_on_device(
                lambda: launch(on_device, chunk_kib << 10), args.reps)
        check(remote, local)
        flat_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        flat_dst = torch.empty_like(flat_src)
        flat_dst.copy_(flat_src)
        rows["device_copy"] = timed_on_device(lambda: flat_dst.copy_(flat_src), args.reps)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        rows["pinned D2H"] = timed_on_device(lambda: pinned.copy_(flat_src, non_blocking=True), args.reps)
        rows["pinned H2D"] = timed_on_device(lambda: flat_dst.copy_(pinned, non_blocking=True), args.reps)
    finally:
        staged_client.close()
        ipc_client.close()
        if nixl_client is not None:
            nixl_client.close()
        raw_sock.close()
        loop.close()
        conn.send(None)
        child.join(timeout=30)
    print(f"{torch.cuda.get_device_name()}: {args.blocks} blocks x {layout.bytes_per_block} B = {nbytes / 2**20:.0f} MiB "
          f"per transfer, {layout.num_layers} layers x K,V segments per block, prefill in its own process, "
          f"{args.reps} reps, bytes verified on the device")
    print(f"{'stage':30} {'best GB/s':>10} {'median GB/s':>12} {'median ms':>10}")
    figures: dict = {}
    for key, seconds in rows.items():
        median = statistics.median(seconds)
        figures[key] = dict(best_gbps=nbytes / min(seconds) / 1e9, median_gbps=nbytes / median / 1e9,
                            median_ms=median * 1000)
        print(f"{key:30} {figures[key]['best_gbps']:10.2f} {figures[key]['median_gbps']:12.2f} {median * 1000:10.3f}")
    print(f"cuda_ipc: a 1-block pull takes {statistics.median(one_block) * 1000:.3f} ms (median): the fixed cost; "
          f"a 4 KiB tcp pull from an endpoint in this process: {tcp_floor_ms:.3f} ms (this machine's round trips)")
    figures["cuda_ipc: 1-block pull ms"] = statistics.median(one_block) * 1000
    figures["tcp: 4 KiB pull in-process ms"] = tcp_floor_ms
    ceiling = figures["device_copy"]["median_gbps"]
    kernel_best = max(v["median_gbps"] for k, v in figures.items() if k.startswith("kernel only"))
    ratios = {"cuda_ipc/device_copy": figures["cuda_ipc: whole pull"]["median_gbps"] / ceiling,
              "cuda_ipc_kernel_only/device_copy": kernel_best / ceiling,
              "cuda_ipc_kernel/device_copy": figures["cuda_ipc_kernel (in-process)"]["median_gbps"] / ceiling,
              "staged/device_copy": figures["staged: end to end"]["median_gbps"] / ceiling,
              "staged/raw_socket": figures["staged: end to end"]["median_gbps"] / figures["raw_socket"]["median_gbps"]}
    if "nixl: whole pull" in figures:
        nixl_gbps = figures["nixl: whole pull"]["median_gbps"]
        ratios.update({"nixl/device_copy": nixl_gbps / ceiling,
                       "nixl/staged": nixl_gbps / figures["staged: end to end"]["median_gbps"],
                       "nixl/cuda_ipc": nixl_gbps / figures["cuda_ipc: whole pull"]["median_gbps"]})
    for name, value in ratios.items():
        print(f"ratio {name} {value:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="cuda-kv-transfer", device=torch.cuda.get_device_name(),
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           blocks=args.blocks, payload_bytes=nbytes, reps=args.reps,
                           ucx_tls=os.environ.get("UCX_TLS", "default"), figures=figures, ratios=ratios),
                      f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
