"""KV transfer throughput: TransferEndpoint/TransferClient over TCP and over the same-host shm path vs Mooncake's
transfer engine (TCP) vs a raw TCP socket vs memcpy, side by side.

The prefill side (a pool of random bytes, one TransferEndpoint per --batch-blocks value, a Mooncake transfer
engine and a raw TCP sender) runs in a child process, as it would in production; the decode side pulls into
its own pool here. Each repetition runs every variant once, interleaved, so machine noise hits them alike.
Every variant's bytes are checked (xxh3 of the whole destination pool, then zeroed) on the first and the last
repetition: a fast wrong transfer does not count.

  raw        : one persistent TCP connection; the sender sendall()s the pool's arrays in chunks of
               --raw-chunk-kib (1 MiB: the fastest on loopback, measured), the receiver recv_into()s them
               straight into the destination pool's memory. No framing, checksum or connection set-up:
               the ceiling for any transport over this link.
  pdserve, pdserve/batch=N: (pdserve: the default batch for the layout) a full pull() per repetition, timed
               around `await pull()`: token check on the control connection, the bytes on the endpoint's plain TCP
               stream (or as ZeroMQ frames where this machine has more than 4 cores: kv/stream.py says why), xxh3
               per segment index and batch on both sides.
  pdserve/stream, pdserve/frames: the same pull with the bytes on the stream, or as ZeroMQ frames on the control
               connection (what a client with more than 4 cores takes by default, or one that cannot reach the
               stream port; the only way before 2026-12-04). `pdserve` is what a client here takes by default.
  shm        : the same pull over the same-host path: the decode side copies the blocks out of the prefill
               process's memory (process_vm_readv), checksums on both sides as over TCP.
  memcpy     : the same bytes copied from a replica of the source pool in this process into the destination
               pool (numpy, one thread): the ceiling for shm.
  mooncake   : Mooncake's TransferEngine, TCP protocol, P2P handshake; one batch_transfer_sync_read per
               repetition with one entry per segment array (benchmarks/mooncake_tcp.py says how it is
               driven). No integrity check of its own. Reported as unavailable, with the reason, where it
               cannot run (e.g. the system lacks libibverbs.so.1, which the wheel links).
  nixl       : the same pull over pdserve's nixl path (kv/nixl_path.py) as the engines take it, with a ReadFence
               (kv/read_fence.py): the endpoint describes each batch, the decode side READs it with NIXL straight
               into the blocks, and the endpoint confirms it held the transfer throughout; no checksums. UCX's
               transports as --ucx-tls says (tcp by default: what hosts without RDMA NICs use between them; UCX
               would take shared memory on one host).
  nixl/landing: the same without a fence: READ into landing buffers, checked there against the endpoint's
               checksums, copied into the blocks.
  nixl/raw   : NIXL alone, the anchor for nixl: one READ of the whole pool (one descriptor per segment array)
               straight into the registered destination pool; no token, checksum or landing copy.
  memcpy/xxh3: in this process, for reference.
CPU columns: core-milliseconds per GB moved on each side (all threads of each process), medians; cpu/raw:
both sides' CPU per repetition over raw's. On a machine whose cores are all busy during the transfer (this
benchmark on 2 cores), throughput/raw tends to raw_cpu/cpu, so cpu/raw is the noise-robust figure.

GB/s are 1e9 bytes per second: best = payload / fastest repetition, median = payload / median time; p10/p90
over the repetitions' GB/s. med/mc and cpu/mc: each variant over Mooncake. --out FILE.json writes all figures.
Printed ratios (of medians, first layout): tcp/raw_socket, shm/memcpy, nixl/tcp (pdserve's nixl path over its tcp
path, the default client here), nixl/nixl_raw and nixl/nixl_landing.

Usage: python benchmarks/transfer.py [--quick] [--payload-mib 64] [--reps 9] [--batch-blocks 8 32] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import shlex
import socket
import statistics
import sys
import threading
import time

# OpenBLAS (loaded with numpy) keeps worker threads that spin on this 2-core machine: they showed up in perf
# profiles of this benchmark taking CPU from both transfer processes. None of its work is linear algebra.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402 (after the environment it reads)
import xxhash  # noqa: E402

from pdserve.kv import ArrayBlockPool, TransferClient, TransferEndpoint, nixl_path, stream
from pdserve.kv.read_fence import ReadFence

import mooncake_tcp  # benchmarks/ is not a package: it is on sys.path as this script's folder
from mooncake_tcp import MooncakeReader, MooncakeSource, MooncakeUnavailable

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


def pdserve_label(batch_blocks: int) -> str:
    return "pdserve" if batch_blocks == 0 else f"pdserve/batch={batch_blocks}"


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
    nixl_ok = nixl_path.why_unavailable() is None
    for batch_blocks in args.batch_blocks:
        ep = TransferEndpoint(pool, bind_host="127.0.0.1", batch_blocks=batch_blocks or None, io_threads=args.io_threads,
                              tune_malloc=not args.no_tune_malloc, offer_nixl=nixl_ok and not endpoints)
        ep.start()
        ep.allow("bench", TOKEN, range(num_blocks), time.time() + 3600)
        endpoints.append(ep)
    mooncake, mooncake_peer = MooncakeSource.start(pool)  # keep `mooncake` referenced: it serves the reads
    nixl_raw = None  # the anchor's agent: NIXL alone, its own registration of the pool
    if nixl_ok:
        nixl_raw = nixl_path.NixlAgent("bench-prefill")
        nixl_raw.register(pool)
    nixl_peer = (nixl_raw.name, nixl_path.encode_metadata(nixl_raw.metadata), pool.memory_regions()) if nixl_raw else None
    listener = socket.create_server(("127.0.0.1", 0))

    def raw_sender() -> None:
        peer, _ = listener.accept()
        with peer:
            while peer.recv(1):
                for chunk in chunks(pool, args.raw_chunk_kib << 10):
                    peer.sendall(chunk)

    threading.Thread(target=raw_sender, daemon=True).start()
    conn.send(([ep.address for ep in endpoints], listener.getsockname()[1], mooncake_peer, pool_digest(pool),
               endpoints[0].host_id, endpoints[0].transports, nixl_peer))
    while conn.recv() == "cpu":  # the decode side asks for our CPU time around each repetition
        conn.send(time.process_time())
    for ep in endpoints:
        ep.stop()
    if nixl_raw is not None:
        nixl_raw.close()
    del mooncake


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


async def bench_layout(layout: str, args) -> dict:
    """One layout, every variant: the layout's entry of the --out JSON (see summarize_layout)."""
    num_segments, segment_nbytes = LAYOUTS[layout]
    block_nbytes = num_segments * segment_nbytes
    num_blocks = max(1, (args.payload_mib << 20) // block_nbytes)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_prefill, args=(child, layout, num_blocks, args), daemon=True)
    proc.start()
    addresses, raw_port, mooncake_peer, digest, peer_host_id, peer_transports, nixl_peer = parent.recv()
    local = make_pool(layout, num_blocks, random=False)
    replica = make_pool(layout, num_blocks, random=True)  # the source's bytes, here: memcpy's source
    client = TransferClient(io_threads=args.io_threads, window_messages=args.window, transport="tcp",
                            tune_malloc=not args.no_tune_malloc)
    frames_client = TransferClient(io_threads=args.io_threads, window_messages=args.window, transport="tcp",
                                   tune_malloc=not args.no_tune_malloc, tcp_stream=False)
    stream_client = TransferClient(io_threads=args.io_threads, window_messages=args.window, transport="tcp",
                                   tune_malloc=not args.no_tune_malloc, tcp_stream=True)
    shm_client = TransferClient(io_threads=args.io_threads, window_messages=args.window, transport="shm",
                                tune_malloc=not args.no_tune_malloc)
    nixl_client = TransferClient(io_threads=args.io_threads, window_messages=args.window, transport="nixl",
                                 tune_malloc=not args.no_tune_malloc)
    nixl_reader, nixl_name = None, None
    if nixl_peer is not None:
        nixl_reader = nixl_path.NixlAgent("bench-decode")
        nixl_reader.register(local)
        nixl_name = nixl_reader.know("bench", nixl_peer[0], nixl_peer[1])
    raw = socket.create_connection(("127.0.0.1", raw_port))
    ids = list(range(num_blocks))
    mooncake, mooncake_reason = None, None
    try:
        mooncake = MooncakeReader(mooncake_peer, local)
    except MooncakeUnavailable as e:
        mooncake_reason = str(e)

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

    def delivered() -> bool:
        """Whether the destination pool holds the source's bytes; zeroes it so that the next check means
        something."""
        ok = pool_digest(local) == digest
        for array in local._arrays:
            array[:] = 0
        return ok

    def pull(address):
        return lambda: client.pull(address, "bench", TOKEN, ids, local, ids, timeout_s=60)

    async def frames_run():
        await frames_client.pull(addresses[0], "bench", TOKEN, ids, local, ids, timeout_s=60)

    async def stream_run():
        await stream_client.pull(addresses[0], "bench", TOKEN, ids, local, ids, timeout_s=60)

    async def shm_run():
        result = await shm_client.pull(addresses[0], "bench", TOKEN, ids, local, ids, timeout_s=60,
                                       peer_host_id=peer_host_id, peer_transports=peer_transports)
        if result.transport != "shm":
            raise RuntimeError(f"the shm variant went over {result.transport}; see the WARNING above")

    async def nixl_run(fence: ReadFence | None = None):
        result = await nixl_client.pull(addresses[0], "bench", TOKEN, ids, local, ids, timeout_s=60,
                                        peer_host_id="the benchmark's prefill process", peer_transports=peer_transports,
                                        fence=fence)
        if result.transport != "nixl":
            raise RuntimeError(f"the nixl variant went over {result.transport}; see the WARNING above")

    async def nixl_direct_run():
        await nixl_run(ReadFence())

    async def nixl_raw_run():
        handle = nixl_reader.post_read(nixl_name, np.array(local.memory_regions(), dtype=np.uint64),
                                       np.array(nixl_peer[2], dtype=np.uint64))
        nixl_reader.wait(handle, time.monotonic() + 60, lambda: None, nbytes=num_blocks * block_nbytes)

    async def memcpy_run():
        for src, dst in zip(replica._arrays, local._arrays):
            np.copyto(dst, src)

    async def mooncake_run():
        mooncake.read(ids, ids)

    async def raw_run():
        raw_receive(raw, local, args.raw_chunk_kib << 10)

    samples: dict[str, list[tuple[float, float, float]]] = {pdserve_label(b): [] for b in args.batch_blocks}
    samples["pdserve/stream"] = []
    samples["pdserve/frames"] = []
    samples["shm"] = []
    samples["nixl"] = []
    samples["nixl/landing"] = []
    samples["nixl/raw"] = []
    samples["memcpy"] = []
    samples["mooncake"] = []
    samples["raw"] = []
    num_rounds = args.warmup + args.reps
    try:
        for rep in range(num_rounds):
            checked = rep in (0, num_rounds - 1)
            for b, address in zip(args.batch_blocks, addresses):
                await measure(pdserve_label(b), pull(address), rep)
                if checked and not delivered():
                    raise RuntimeError(f"{pdserve_label(b)} delivered wrong bytes")
            for name, run in (("pdserve/stream", stream_run), ("pdserve/frames", frames_run)):
                await measure(name, run, rep)
                if checked and not delivered():
                    raise RuntimeError(f"{name} delivered wrong bytes")
            if mooncake is not None:
                try:
                    await measure("mooncake", mooncake_run, rep)
                    if checked and not delivered():
                        raise MooncakeUnavailable("delivered wrong bytes (destination pool digest differs)")
                except MooncakeUnavailable as e:
                    mooncake.close()
                    mooncake, mooncake_reason = None, str(e)
            await measure("raw", raw_run, rep)
            if checked and not delivered():
                raise RuntimeError("the raw socket delivered wrong bytes")
            if "shm" in peer_transports:
                await measure("shm", shm_run, rep)
                if checked and not delivered():
                    raise RuntimeError("shm delivered wrong bytes")
            if nixl_reader is not None:
                for name, run in (("nixl", nixl_direct_run), ("nixl/landing", nixl_run), ("nixl/raw", nixl_raw_run)):
                    await measure(name, run, rep)
                    if checked and not delivered():
                        raise RuntimeError(f"{name} delivered wrong bytes")
            await measure("memcpy", memcpy_run, rep)
            if checked and not delivered():
                raise RuntimeError("memcpy delivered wrong bytes")
    finally:
        if mooncake is not None:
            mooncake.close()
        raw.close()
        client.close()
        frames_client.close()
        stream_client.close()
        shm_client.close()
        nixl_client.close()
        if nixl_reader is not None:
            nixl_reader.close()
        parent.send("stop")
        proc.join(timeout=10)
    if mooncake_reason is not None:
        del samples["mooncake"]
    for name in ("shm", "nixl", "nixl/landing", "nixl/raw"):
        if not samples[name]:
            del samples[name]
    result = summarize_layout(samples, num_blocks * block_nbytes, mooncake_reason)
    return dict(block_nbytes=block_nbytes, num_segments=num_segments, num_blocks=num_blocks,
                payload_bytes=num_blocks * block_nbytes, **result)


def summarize_layout(samples: dict[str, list[tuple[float, float, float]]], payload: int,
                     mooncake_reason: str | None) -> dict:
    """{"variants": {name: figures}, "pdserve_over_mooncake": {name: ratios} or None} from (seconds, recv CPU
    seconds, send CPU seconds) per measured repetition."""
    gb = payload / 1e9
    variants: dict[str, dict] = {}
    for name, ss in samples.items():
        times = [s[0] for s in ss]
        gbps = [gb / t for t in times]
        p10, p90 = (None, None)
        if len(gbps) >= 2:
            deciles = statistics.quantiles(gbps, n=10, method="inclusive")
            p10, p90 = deciles[0], deciles[-1]
        variants[name] = dict(available=True, num_samples=len(ss), best_gbps=max(gbps),
                              median_gbps=gb / statistics.median(times), p10_gbps=p10, p90_gbps=p90,
                              cpu_recv_ms_per_gb=statistics.median(s[1] for s in ss) / gb * 1e3,
                              cpu_send_ms_per_gb=statistics.median(s[2] for s in ss) / gb * 1e3,
                              cpu_ms_per_gb=statistics.median(s[1] + s[2] for s in ss) / gb * 1e3)
    raw, mc, memcpy = variants["raw"], variants.get("mooncake"), variants["memcpy"]
    for v in variants.values():
        v.update(ratio_median_to_memcpy=v["median_gbps"] / memcpy["median_gbps"],
                 ratio_best_to_raw=v["best_gbps"] / raw["best_gbps"],
                 ratio_median_to_raw=v["median_gbps"] / raw["median_gbps"],
                 cpu_ratio_to_raw=v["cpu_ms_per_gb"] / raw["cpu_ms_per_gb"],
                 ratio_median_to_mooncake=v["median_gbps"] / mc["median_gbps"] if mc else None,
                 cpu_ratio_to_mooncake=v["cpu_ms_per_gb"] / mc["cpu_ms_per_gb"] if mc else None)
    pdserve_over_mooncake = None
    if mc is None:
        variants["mooncake"] = dict(available=False, reason=mooncake_reason)
    else:
        pdserve_over_mooncake = {name: dict(median_gbps=v["ratio_median_to_mooncake"],
                                            cpu_per_gb=v["cpu_ratio_to_mooncake"])
                                 for name, v in variants.items() if name.split("/")[0] in ("pdserve", "shm")}
    return dict(variants=variants, pdserve_over_mooncake=pdserve_over_mooncake)


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


def print_layout(layout: str, result: dict) -> None:
    for name, v in result["variants"].items():
        head = (f"{layout:<19} {name:<16} {result['block_nbytes']:>8} {result['num_segments']:>3} "
                f"{result['num_blocks']:>6}")
        if not v["available"]:
            print(f"{head} unavailable: {v['reason']}")
            continue
        to_mc = (f"{v['ratio_median_to_mooncake']:>6.2f} {v['cpu_ratio_to_mooncake']:>6.2f}"
                 if v["ratio_median_to_mooncake"] is not None else f"{'-':>6} {'-':>6}")
        print(f"{head} {v['best_gbps']:>9.2f} {v['median_gbps']:>8.2f} {v['ratio_best_to_raw']:>8.2f} "
              f"{v['ratio_median_to_raw']:>7.2f} {v['cpu_recv_ms_per_gb']:>8.0f} {v['cpu_send_ms_per_gb']:>8.0f} "
              f"{v['cpu_ratio_to_raw']:>7.2f} {to_mc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9, help="measured repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-blocks", type=int, nargs="+", default=[0, 32],
                        help="one endpoint per value; 0: pdserve's default for the layout (kv.endpoint.default_batch_blocks)")
    parser.add_argument("--window", type=int, default=8, help="messages (~2 MiB) in flight per pull (client credit)")
    parser.add_argument("--io-threads", type=int, default=1, help="zmq io threads on each side")
    parser.add_argument("--raw-chunk-kib", type=int, default=1024, help="sendall/recv_into size of the raw baseline")
    parser.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's malloc defaults on both sides")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--ucx-tls", default="tcp", help="UCX_TLS for the nixl variants, both sides (tcp: as between "
                        "hosts without RDMA NICs); 'default': leave UCX to choose")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 4 MiB, 2 reps, 2 layouts")
    parser.add_argument("--out", metavar="FILE.json", help="also write every figure, settings and machine as JSON")
    args = parser.parse_args()
    args.batch_blocks = list(dict.fromkeys(args.batch_blocks))
    if args.ucx_tls != "default":
        os.environ["UCX_TLS"] = args.ucx_tls  # before either side makes its NIXL agent (the child inherits it)
    if args.quick:
        args.payload_mib, args.reps, args.warmup = 4, 2, 1
        args.layouts = ["llama3-8b/1seg", "smollm2-135m/60seg"]

    print(f"# {os.cpu_count()} CPUs; payload {args.payload_mib} MiB; {args.reps} reps after {args.warmup} warm-up; "
          f"window {args.window} messages; zmq io_threads {args.io_threads}; raw chunks {args.raw_chunk_kib} KiB; "
          f"malloc {'glibc defaults' if args.no_tune_malloc else 'tuned'}; "
          f"mooncake {mooncake_tcp.version() or 'not installed'} ({mooncake_tcp.PROTOCOL}, {mooncake_tcp.API}); "
          f"tcp clients here take {'the stream' if stream.prefers_stream() else 'frames'} by default; "
          f"nixl {nixl_path.why_unavailable() or 'loaded'} (UCX_TLS={os.environ.get('UCX_TLS', 'default')})")
    copy_gbps, hash_gbps = reference(args.payload_mib << 20, max(args.reps, 3))
    print(f"# reference in-process: memcpy {copy_gbps:.2f} GB/s, xxh3_64 {hash_gbps:.2f} GB/s")
    header = (f"{'layout':<19} {'variant':<16} {'block B':>8} {'seg':>3} {'blocks':>6} {'best GB/s':>9} "
              f"{'med GB/s':>8} {'best/raw':>8} {'med/raw':>7} {'cpu recv':>8} {'cpu send':>8} {'cpu/raw':>7} "
              f"{'med/mc':>6} {'cpu/mc':>6}")
    print(header)
    print("-" * len(header))
    layouts = {}
    for layout in args.layouts:
        layouts[layout] = asyncio.run(bench_layout(layout, args))
        print_layout(layout, layouts[layout])
    first = layouts[args.layouts[0]]["variants"]
    ratios = {"tcp/raw_socket": first["pdserve"]["ratio_median_to_raw"] if "pdserve" in first else None,
              "shm/memcpy": first["shm"]["ratio_median_to_memcpy"] if "shm" in first else None,
              "nixl/tcp": (first["nixl"]["median_gbps"] / first["pdserve"]["median_gbps"]
                           if "nixl" in first and "pdserve" in first else None),
              "nixl/nixl_raw": (first["nixl"]["median_gbps"] / first["nixl/raw"]["median_gbps"]
                                if "nixl" in first and "nixl/raw" in first else None),
              "nixl/nixl_landing": (first["nixl"]["median_gbps"] / first["nixl/landing"]["median_gbps"]
                                    if "nixl" in first and "nixl/landing" in first else None)}
    print(f"# ratios of medians, layout {args.layouts[0]}")
    for name, value in ratios.items():
        if value is not None:
            print(f"ratio {name} {value:.2f}")
    if args.out:
        report = dict(
            benchmark="kv-transfer",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=shlex.join(sys.orig_argv),
            machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                         load_average_1m=os.getloadavg()[0]),
            settings=dict(payload_mib=args.payload_mib, reps=args.reps, warmup=args.warmup,
                          batch_blocks=args.batch_blocks, window=args.window, io_threads=args.io_threads,
                          raw_chunk_kib=args.raw_chunk_kib, tune_malloc=not args.no_tune_malloc,
                          layouts=args.layouts, ucx_tls=os.environ.get("UCX_TLS", "default")),
            units=dict(gbps="1e9 bytes per second", cpu_ms_per_gb="core-milliseconds (both sides unless recv/send) "
                       "per 1e9 bytes moved", ratio_median_to_raw="median_gbps / raw's median_gbps",
                       pdserve_over_mooncake="pdserve variant's median_gbps (cpu_ms_per_gb) over Mooncake's"),
            mooncake=dict(version=mooncake_tcp.version(), protocol=mooncake_tcp.PROTOCOL, metadata="P2PHANDSHAKE",
                          api=mooncake_tcp.API, note=mooncake_tcp.NOTE,
                          env={k: v for k, v in os.environ.items() if k.startswith("MC_")}),
            reference=dict(memcpy_gbps=copy_gbps, xxh3_gbps=hash_gbps),
            ratios=dict(layout=args.layouts[0], **{k: v for k, v in ratios.items() if v is not None}),
            layouts=layouts,
        )
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"# figures written to {args.out}")


if __name__ == "__main__":
    main()
