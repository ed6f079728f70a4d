"""KV transfer throughput: TransferEndpoint/TransferClient vs a raw TCP socket vs memcpy, side by side.

The prefill side (a pool of random bytes, one TransferEndpoint per --batch-blocks value, and a raw TCP
sender) runs in a child process, as it would in production; the decode side pulls into its own pool here.
Each repetition runs every variant once, interleaved, so machine noise hits them alike.

  raw        : one persistent TCP connection; the sender sendall()s the pool's arrays in chunks of
               --raw-chunk-kib (1 MiB: the fastest on loopback, measured), the receiver recv_into()s them
               straight into the destination pool's memory. No framing, checksum or connection set-up:
               the ceiling for any transport over this link.
  batch=N    : a full pull() per repetition, timed around `await pull()` (token check, credit-based
               messages, xxh3 per block on both sides, one copy into place on the decode side).
  memcpy/xxh3: in this process, for reference.
CPU columns: core-milliseconds per GB moved on each side (all threads of each process), medians; cpu/raw:
both sides' CPU per repetition over raw's. On a machine whose cores are all busy during the transfer (this
benchmark on 2 cores), throughput/raw tends to raw_cpu/cpu, so cpu/raw is the noise-robust figure.

Usage: python benchmarks/transfer.py [--quick] [--payload-mib 64] [--reps 9] [--batch-blocks 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time

import numpy as np
import xxhash

from pdserve.kv import ArrayBlockPool, TransferClient, TransferEndpoint

TOKEN = "bench-token"
BLOCK_TOKENS = 16


def llama3_8b_bytes_per_layer_kv() -> int:
    return 8 * 128 * 2 * BLOCK_TOKENS  # kv heads x head_dim x bf16 bytes x tokens: one K (or V) of one layer


def smollm2_135m_bytes_per_layer_kv() -> int:
    return 3 * 64 * 2 * BLOCK_TOKENS


# name -> (segments per block, bytes per segment); each model once as one segment per block, once as one
# segment per layer and K/V (how vLLM-style per-layer KV tensors look to the transfer).
LAYOUTS = {
    "llama3-8b/1seg": (1, 32 * 2 * llama3_8b_bytes_per_layer_kv()),  # 2 MiB blocks
    "llama3-8b/64seg": (64, llama3_8b_bytes_per_layer_kv()),  # 64 x 32 KiB
    "smollm2-135m/1seg": (1, 30 * 2 * smollm2_135m_bytes_per_layer_kv()),  # 368,640 B blocks
    "smollm2-135m/60seg": (60, smollm2_135m_bytes_per_layer_kv()),  # 60 x 6 KiB
}


def make_pool(layout: str, num_blocks: int, random: bool) -> ArrayBlockPool:
    """One array per segment, [num_blocks, segment_nbytes]: block i's segment k is arrays[k][i]."""
    num_segments, segment_nbytes = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    make = (lambda: rng.integers(0, 256, (num_blocks, segment_nbytes), dtype=np.uint8)) if random else (
        lambda: np.zeros((num_blocks, segment_nbytes), np.uint8))
    return ArrayBlockPool([make() for _ in range(num_segments)], layout)


def pool_digest(pool: ArrayBlockPool) -> int:
    h = xxhash.xxh3_64()
    for b in range(pool.num_blocks):
        for seg in pool.segments(b):
            h.update(seg)
    return h.intdigest()


def chunks(pool: ArrayBlockPool, chunk_nbytes: int):
    for array in pool._arrays:
        view = memoryview(array).cast("B")
        for offset in range(0, view.nbytes, chunk_nbytes):
            yield view[offset:offset + chunk_nbytes]


# ---------------------------------------------------------------------------------------- prefill side


def serve_prefill(conn, layout: str, num_blocks: int, args) -> None:
    pool = make_pool(layout, num_blocks, random=True)
    endpoints = []
    for batch_blocks in args.batch_blocks:
        ep = TransferEndpoint(pool, bind_host="127.0.0.1", batch_blocks=batch_blocks, io_threads=args.io_threads,
                              tune_malloc=not args.no_tune_malloc)
        ep.start()
        ep.allow("bench", TOKEN, range(num_blocks), time.time() + 3600)
        endpoints.append(ep)
    listener = socket.create_server(("127.0.0.1", 0))

    def raw_sender() -> None:
        peer, _ = listener.accept()
        with peer:
            while peer.recv(1):
                for chunk in chunks(pool, args.raw_chunk_kib << 10):
                    peer.sendall(chunk)

    threading.Thread(target=raw_sender, daemon=True).start()
    conn.send(([ep.address for ep in endpoints], listener.getsockname()[1], pool_digest(pool)))
    while conn.recv() == "cpu":  # the decode side asks for our CPU time around each repetition
        conn.send(time.process_time())
    for ep in endpoints:
        ep.stop()


# ---------------------------------------------------------------------------------------- decode side


def raw_receive(sock: socket.socket, pool: ArrayBlockPool, chunk_nbytes: int) -> None:
    sock.sendall(b"x")
    for view in chunks(pool, chunk_nbytes):
        got = 0
        while got < view.nbytes:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("raw sender closed the connection")
            got += n


async def bench_layout(layout: str, args) -> list[dict]:
    num_segments, segment_nbytes = LAYOUTS[layout]
    block_nbytes = num_segments * segment_nbytes
    num_blocks = max(1, (args.payload_mib << 20) // block_nbytes)
    payload = num_blocks * block_nbytes
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_prefill, args=(child, layout, num_blocks, args), daemon=True)
    proc.start()
    addresses, raw_port, digest = parent.recv()
    local = make_pool(layout, num_blocks, random=False)
    client = TransferClient(io_threads=args.io_threads, window_messages=args.window,
                            tune_malloc=not args.no_tune_malloc)
    raw = socket.create_connection(("127.0.0.1", raw_port))
    ids = list(range(num_blocks))

    def peer_cpu() -> float:
        parent.send("cpu")
        return parent.recv()

    async def measure(name: str, run, rep: int) -> None:
        cpu, peer = time.process_time(), peer_cpu()
        start = time.perf_counter()
        await run()
        elapsed = time.perf_counter() - start
        cpu, peer = time.process_time() - cpu, peer_cpu() - peer
        if rep >= args.warmup:
            samples[name].append((elapsed, cpu, peer))

    def pull(address):
        return lambda: client.pull(address, "bench", TOKEN, ids, local, ids, timeout_s=60)

    async def raw_run():
        raw_receive(raw, local, args.raw_chunk_kib << 10)

    samples: dict[str, list[tuple[float, float, float]]] = {f"batch={b}": [] for b in args.batch_blocks}
    samples["raw"] = []
    try:
        for rep in range(args.warmup + args.reps):
            for b, address in zip(args.batch_blocks, addresses):
                await measure(f"batch={b}", pull(address), rep)
                if rep == 0:
                    assert pool_digest(local) == digest, "transport delivered wrong bytes"
                    local._arrays[0][:] = 0  # so that the next variant's check means something
            await measure("raw", raw_run, rep)
    finally:
        raw.close()
        client.close()
        parent.send("stop")
        proc.join(timeout=10)
    gb = payload / 1e9
    raw_times = [s[0] for s in samples["raw"]]
    raw_best, raw_median = gb / min(raw_times), gb / statistics.median(raw_times)
    raw_cpu = statistics.median(s[1] + s[2] for s in samples["raw"])
    rows = []
    for name, ss in samples.items():
        times = [s[0] for s in ss]
        best, median = gb / min(times), gb / statistics.median(times)
        rows.append(dict(layout=layout, variant=name, block_nbytes=block_nbytes, num_segments=num_segments,
                         num_blocks=num_blocks, best=best, median=median,
                         ratio_best=best / raw_best, ratio_median=median / raw_median,
                         cpu_recv=statistics.median(s[1] for s in ss) / gb * 1e3,
                         cpu_send=statistics.median(s[2] for s in ss) / gb * 1e3,
                         cpu_ratio=statistics.median(s[1] + s[2] for s in ss) / raw_cpu))
    return rows


def reference(payload: int, reps: int) -> tuple[float, float]:
    """memcpy and xxh3_64 GB/s (best of reps) over the payload size, in this process."""
    src = np.random.default_rng(1).integers(0, 256, payload, dtype=np.uint8)
    dst = np.empty_like(src)
    copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    hashing = min(_timed(lambda: xxhash.xxh3_64_intdigest(src)) for _ in range(reps))
    return payload / copy / 1e9, payload / hashing / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9, help="measured repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-blocks", type=int, nargs="+", default=[8, 32], help="one endpoint per value")
    parser.add_argument("--window", type=int, default=8, help="messages (~2 MiB) in flight per pull (client credit)")
    parser.add_argument("--io-threads", type=int, default=1, help="zmq io threads on each side")
    parser.add_argument("--raw-chunk-kib", type=int, default=1024, help="sendall/recv_into size of the raw baseline")
    parser.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's malloc defaults on both sides")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 4 MiB, 2 reps, 2 layouts")
    args = parser.parse_args()
    args.batch_blocks = list(dict.fromkeys(args.batch_blocks))
    if args.quick:
        args.payload_mib, args.reps, args.warmup = 4, 2, 1
        args.layouts = ["llama3-8b/1seg", "smollm2-135m/60seg"]

    print(f"# {os.cpu_count()} CPUs; payload {args.payload_mib} MiB; {args.reps} reps after {args.warmup} warm-up; "
          f"window {args.window} messages; zmq io_threads {args.io_threads}; raw chunks {args.raw_chunk_kib} KiB; "
          f"malloc {'glibc defaults' if args.no_tune_malloc else 'tuned'}")
    copy_gbps, hash_gbps = reference(args.payload_mib << 20, max(args.reps, 3))
    print(f"# reference in-process: memcpy {copy_gbps:.2f} GB/s, xxh3_64 {hash_gbps:.2f} GB/s")
    header = (f"{'layout':<19} {'variant':<8} {'block B':>8} {'seg':>3} {'blocks':>6} {'best GB/s':>9} "
              f"{'med GB/s':>8} {'best/raw':>8} {'med/raw':>7} {'cpu recv':>8} {'cpu send':>8} {'cpu/raw':>7}")
    print(header)
    print("-" * len(header))
    for layout in args.layouts:
        for r in asyncio.run(bench_layout(layout, args)):
            print(f"{r['layout']:<19} {r['variant']:<8} {r['block_nbytes']:>8} {r['num_segments']:>3} "
                  f"{r['num_blocks']:>6} {r['best']:>9.2f} {r['median']:>8.2f} {r['ratio_best']:>8.2f} "
                  f"{r['ratio_median']:>7.2f} {r['cpu_recv']:>8.0f} {r['cpu_send']:>8.0f} {r['cpu_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
