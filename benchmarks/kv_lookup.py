"""KV lookup: how long the broker takes to say which workers hold how much of a prompt, in-process and over NATS.

A prompt of --blocks blocks (default 1024 blocks of 32 tokens: 32K tokens) is looked up in an index of
--workers workers (default 100), in four cases, each with its own prompt (all four live in one index):

  all_hold_all         every worker holds the whole prompt (one answer for all: the cheapest walk)
  shared_prefix        every worker holds the first --shared-blocks blocks (a system prompt), --long-holders
                       of them hold longer prefixes of random lengths (a conversation served before)
  distinct_prefixes    worker i holds the first ~(i+1)*blocks/workers blocks: as many different answers as
                       workers (the worst case of the index's bisection)
  miss                 nobody holds the first block

Besides, each worker holds --background-prompts other prompts of blocks/4 blocks, so the hash table is not
trivially small. Figures:

  in_process_us        BlockIndex.lookup() in this process (services.kv_broker.index), all cases interleaved
  nats_round_trip_ms   KVLookup -> KVLookupReply through a real nats-server to a real broker process
                       (`pdserve kv-broker`), one request at a time from one pdserve.bus.Bus connection; the
                       broker's index is filled by publishing the same KVEvents as 100 workers would
  nats_floor_ms        the same round trip for a one-block prompt nobody holds: NATS, asyncio and the bus
                       alone, which the figures above include
  prompt_hashing_ms    what the router pays first: pdserve.kv.hashing.block_hashes() of the prompt's tokens
  codec_us             encoding a KVLookup of the prompt, validating it on receipt, and the same for the reply

Every answer over NATS is checked against the in-process index (`answers_agree`). Percentiles are of single
lookups; this is a latency benchmark, not a load test. On a busy or small machine the tails are the
machine's; the p50s are the figures to compare.

--out FILE.json: {benchmark, machine, config, index {num_blocks, num_worker_blocks}, prompt_hashing_ms,
codec_us, in_process_us {case: {p50, p90, p99, mean, max, n, num_workers_matched, num_distinct_answers}},
nats_round_trip_ms {case: {...}}, nats_floor_ms, answers_agree, processes}. The exit status is 1 if an answer disagreed.

Usage: python benchmarks/kv_lookup.py [--workers 100] [--blocks 1024] [--block-size 32] [--iterations 2000]
           [--nats-requests 1000] [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # services.* from a checkout

from machine import machine_info  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)
from pdserve import nats_server, subjects  # noqa: E402
from pdserve.bus import Bus, NoResponders  # noqa: E402
from pdserve.kv.hashing import ROOT_HASH, block_hashes  # noqa: E402
from pdserve.protocol import KVEvent, KVLookup, KVLookupReply, decode, encode  # noqa: E402
from services.kv_broker.index import BlockIndex  # noqa: E402

MODEL = "bench-model"
CASES = ("all_hold_all", "shared_prefix", "distinct_prefixes", "miss")


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": sum(s) / len(s), "max": s[-1], "n": len(s)}


# ------------------------------------------------------------------------------------ the index


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(n)]


def build_events(args: argparse.Namespace) -> tuple[dict[str, list[int]], dict[str, list[int]], list[KVEvent]]:
    """The four cases' prompts (tokens and hashes) and every worker's KVEvents (one stored chain each)."""
    rng = random.Random(args.seed)
    bs, n, workers = args.block_size, args.blocks, [f"worker-{i:03d}" for i in range(args.workers)]
    tokens = {case: random_tokens(rng, n * bs) for case in CASES}
    hashes = {case: block_hashes(tokens[case], bs) for case in CASES}
    held: dict[str, dict[str, int]] = {case: {} for case in CASES}  # case -> worker -> leading blocks held
    for i, w in enumerate(workers):
        held["all_hold_all"][w] = n
        held["shared_prefix"][w] = min(n, args.shared_blocks)
        held["distinct_prefixes"][w] = max(1, (i + 1) * n // len(workers))
    for w in rng.sample(workers, min(args.long_holders, len(workers))):
        held["shared_prefix"][w] = rng.randrange(min(n, args.shared_blocks + 1), n + 1)
    miss_other = block_hashes(random_tokens(rng, n * bs), bs)  # the miss prompt's blocks after the first, held
    events = []
    for w in workers:
        for case in ("all_hold_all", "shared_prefix", "distinct_prefixes"):
            events.append(KVEvent(worker_id=w, model=MODEL, stored=tuple(hashes[case][:held[case][w]]),
                                  parent_hash=ROOT_HASH))
        events.append(KVEvent(worker_id=w, model=MODEL, stored=tuple(miss_other[: n // 4]), parent_hash=ROOT_HASH))
        for _ in range(args.background_prompts):
            background = block_hashes(random_tokens(rng, (n // 4) * bs), bs)
            events.append(KVEvent(worker_id=w, model=MODEL, stored=tuple(background), parent_hash=ROOT_HASH))
    return tokens, hashes, events


def apply(index: BlockIndex, event: KVEvent) -> None:
    index.store(event.worker_id, event.model, event.stored, event.parent_hash)


def time_in_process(index: BlockIndex, hashes: dict[str, list[int]], iterations: int) -> dict[str, dict]:
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(iterations):  # interleaved, so machine noise hits every case alike
        for case in CASES:
            start = time.perf_counter()
            index.lookup(MODEL, hashes[case])
            samples[case].append((time.perf_counter() - start) * 1e6)
    out = {}
    for case in CASES:
        answer = index.lookup(MODEL, hashes[case])
        out[case] = {**percentiles(samples[case]), "num_workers_matched": len(answer),
                     "num_distinct_answers": len(set(answer.values()))}
    return out


def time_codec(hashes: list[int], answer: dict[str, int], iterations: int) -> dict:
    request, reply = KVLookup(model=MODEL, block_hashes=tuple(hashes)), KVLookupReply(num_matched_blocks=answer)
    request_bytes, reply_bytes = encode(request), encode(reply)
    figures = {}
    for name, step in (("encode_lookup", lambda: encode(KVLookup(model=MODEL, block_hashes=tuple(hashes)))),
                       ("decode_lookup", lambda: decode(request_bytes, KVLookup)),
                       ("encode_reply", lambda: encode(KVLookupReply(num_matched_blocks=answer))),
                       ("decode_reply", lambda: decode(reply_bytes, KVLookupReply))):
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e6)
        figures[name] = percentiles(samples)
    figures["lookup_bytes"], figures["reply_bytes"] = len(request_bytes), len(reply_bytes)
    return figures


# ----------------------------------------------------------------------------------- over NATS


class BrokerProcess:
    """nats-server and `pdserve kv-broker`, owned by pid and stopped in stop()."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.nats: nats_server.NatsServer | None = None
        self.broker: subprocess.Popen | None = None
        self._log = None

    def start(self) -> str:
        self.nats = nats_server.start(store_dir=os.path.join(self.log_dir, "nats"), die_with_parent=True)
        self._log = open(os.path.join(self.log_dir, "kv-broker.log"), "wb")
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "kv-broker", "--nats", self.nats.url, "--log-level", "WARNING"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=nats_server.set_parent_death_signal)
        return self.nats.url

    def pids(self) -> dict:
        return {"nats": self.nats.process.pid if self.nats else None, "kv_broker": self.broker.pid if self.broker else None}

    def stop(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
        if self._log:
            self._log.close()
        if self.nats is not None:
            self.nats.stop()


async def time_over_nats(url: str, events: list[KVEvent], hashes: dict[str, list[int]], expected: dict[str, dict],
                         requests: int, log) -> tuple[dict[str, dict], dict, bool]:
    bus = await Bus.connect(url, "kv-lookup-bench")
    try:
        async def ask(case: str) -> dict[str, int]:
            prompt = hashes[case] if case != "floor" else [12345]
            reply = await bus.request(subjects.KV_LOOKUP, KVLookup(model=MODEL, block_hashes=tuple(prompt)),
                                      KVLookupReply, timeout_s=10)
            return reply.num_matched_blocks

        deadline = time.monotonic() + 60
        while True:  # the broker is up once it answers
            with contextlib.suppress(NoResponders):
                await ask("miss")
                break
            assert time.monotonic() < deadline, "the broker did not answer within 60 s"
            await asyncio.sleep(0.1)
        for k, event in enumerate(events):
            await bus.publish(subjects.kv_events(event.worker_id), event)
            if k % 200 == 0:
                await bus.flush()
        await bus.flush()
        while {case: await ask(case) for case in CASES} != expected:  # until the broker applied everything
            assert time.monotonic() < deadline, "the broker's answers never matched the in-process index"
            await asyncio.sleep(0.2)
        log(f"broker index filled from {len(events)} KV events")
        for _ in range(20):  # warm-up
            for case in CASES:
                await ask(case)
        samples: dict[str, list[float]] = {case: [] for case in (*CASES, "floor")}
        agree = True
        for _ in range(requests):
            for case in (*CASES, "floor"):
                start = time.perf_counter()
                answer = await ask(case)
                samples[case].append((time.perf_counter() - start) * 1e3)
                agree = agree and answer == expected.get(case, {})
        return {case: percentiles(samples[case]) for case in CASES}, percentiles(samples["floor"]), agree
    finally:
        await bus.close()


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=100, help="workers in the index [default 100]")
    p.add_argument("--blocks", type=int, default=1024, help="blocks of the looked-up prompt [default 1024]")
    p.add_argument("--block-size", type=int, default=32, help="tokens per block [default 32]")
    p.add_argument("--shared-blocks", type=int, default=64, help="shared_prefix: blocks every worker holds [default 64]")
    p.add_argument("--long-holders", type=int, default=10, help="shared_prefix: workers holding more [default 10]")
    p.add_argument("--background-prompts", type=int, default=None,
                   help="other prompts (blocks/4 blocks) each worker holds [default 8; quick: 1]")
    p.add_argument("--iterations", type=int, default=None, help="in-process lookups per case [default 2000; quick: 100]")
    p.add_argument("--nats-requests", type=int, default=None,
                   help="lookups over NATS per case [default 1000; quick: 50]")
    p.add_argument("--seed", type=int, default=1, help="prompt and holder randomness [default 1]")
    p.add_argument("--out", default=None, help="write every figure and the machine's description to this JSON file")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds, same index sizes")
    args = p.parse_args(argv)
    if args.background_prompts is None:
        args.background_prompts = 1 if args.quick else 8
    if args.iterations is None:
        args.iterations = 100 if args.quick else 2000
    if args.nats_requests is None:
        args.nats_requests = 50 if args.quick else 1000
    for name in ("workers", "blocks", "block_size", "iterations", "nats_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.blocks < 4:
        p.error("--blocks must be at least 4")
    return args


def print_report(report: dict) -> None:
    c = report["config"]
    print(f"KV lookup of a {c['blocks'] * c['block_size']}-token prompt ({c['blocks']} blocks of {c['block_size']}) "
          f"over {c['workers']} workers; index of {report['index']['num_blocks']} blocks, "
          f"{report['index']['num_worker_blocks']} (worker, block) entries")
    print(f"  router hashes the prompt: p50 {report['prompt_hashing_ms']['p50']:.2f} ms")
    codec = report["codec_us"]
    print(f"  KVLookup {codec['lookup_bytes']} bytes: encode p50 {codec['encode_lookup']['p50']:.0f} us, "
          f"validate on receipt p50 {codec['decode_lookup']['p50']:.0f} us")
    print(f"  {'case':<20} {'workers':>7} {'answers':>7} {'in-process p50':>15} {'p99':>9} "
          f"{'NATS p50':>10} {'p99':>9}")
    for case in CASES:
        ip, rt = report["in_process_us"][case], report["nats_round_trip_ms"][case]
        print(f"  {case:<20} {ip['num_workers_matched']:>7} {ip['num_distinct_answers']:>7} "
              f"{ip['p50']:>12.1f} us {ip['p99']:>6.1f} us {rt['p50']:>7.3f} ms {rt['p99']:>6.3f} ms")
    print(f"  NATS round trip of a one-block lookup (the floor): p50 {report['nats_floor_ms']['p50']:.3f} ms, "
          f"p99 {report['nats_floor_ms']['p99']:.3f} ms")
    print(f"  answers over NATS agree with the in-process index: {report['answers_agree']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(f"kv_lookup: {message}", file=sys.stderr, flush=True)

    machine = machine_info()
    tokens, hashes, events = build_events(args)
    index = BlockIndex()
    start = time.perf_counter()
    for event in events:
        apply(index, event)
    log(f"in-process index built from {len(events)} events in {time.perf_counter() - start:.2f} s")
    expected = {case: index.lookup(MODEL, hashes[case]) for case in CASES}
    in_process = time_in_process(index, hashes, args.iterations)
    hashing = []
    for _ in range(max(5, args.iterations // 20)):
        t0 = time.perf_counter()
        block_hashes(tokens["all_hold_all"], args.block_size)
        hashing.append((time.perf_counter() - t0) * 1e3)
    codec = time_codec(hashes["all_hold_all"], expected["all_hold_all"], max(20, args.iterations // 4))
    with tempfile.TemporaryDirectory(prefix="pdserve-kv-lookup-") as tmp:
        system = BrokerProcess(tmp)
        try:
            url = system.start()
            processes = system.pids()
            round_trip, floor, agree = asyncio.run(time_over_nats(url, events, hashes, expected, args.nats_requests,
                                                                  log))
        finally:
            system.stop()
    machine["load_average_at_end"] = list(os.getloadavg())
    report = {
        "benchmark": "kv_lookup",
        "machine": machine,
        "config": {"workers": args.workers, "blocks": args.blocks, "block_size": args.block_size,
                   "shared_blocks": args.shared_blocks, "long_holders": args.long_holders,
                   "background_prompts": args.background_prompts, "iterations": args.iterations,
                   "nats_requests": args.nats_requests, "seed": args.seed, "quick": args.quick},
        "index": {"num_blocks": len(set().union(*index.view().get(MODEL, {}).values())),
                  "num_worker_blocks": sum(index.num_blocks(w) for w in {e.worker_id for e in events})},
        "prompt_hashing_ms": percentiles(hashing),
        "codec_us": codec,
        "in_process_us": in_process,
        "nats_round_trip_ms": round_trip,
        "nats_floor_ms": floor,
        "answers_agree": agree,
        "processes": processes,
    }
    print_report(report)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        log(f"figures written to {args.out}")
    if not agree:
        log("an answer over NATS differed from the in-process index")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
