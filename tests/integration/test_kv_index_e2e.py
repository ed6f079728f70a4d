"""KV events end to end: `pdserve up --engine mock` (prefix caching on by default), its broker's index over NATS.

After requests through the router, the broker's lookup for each served prompt names the prefill worker and
the decode worker that keep its blocks; the broker killed with SIGKILL and restarted by `pdserve up` rebuilds the
same answers from the workers' snapshots within a deadline; a worker that stops drops out of the answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.kv.hashing import block_hashes
from pdserve.protocol import KVLookup, KVLookupReply
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, alive, descendants, free_port

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32  # WorkerConfig's default
PROMPTS = [f"Prompt {k}: " + "the quick brown fox jumps over the lazy dog; " * (3 + k) for k in range(3)]
REBUILD_DEADLINE_S = 10.0


def service_pid(up: PdserveUp, command: str) -> int:
    """The pid of the child of `pdserve up` running `pdserve <command>` (found by pid, never by name)."""
    for pid in descendants(up.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if command.encode() in argv:
            return pid
    raise AssertionError(f"no {command} under pdserve up")


async def lookups(url: str) -> dict[str, dict[str, int]]:
    """prompt -> the broker's answer (worker_id -> leading blocks); {} per prompt while no broker answers."""
    bus = await Bus.connect(url, "test-lookup")
    try:
        answers = {}
        for prompt in PROMPTS:
            hashes = block_hashes(ByteTokenizer().encode(prompt), BLOCK_SIZE)
            try:
                reply = await bus.request(subjects.KV_LOOKUP, KVLookup(model=MOCK_MODEL, block_hashes=tuple(hashes)),
                                          KVLookupReply, timeout_s=1)
                answers[prompt] = reply.num_matched_blocks
            except Exception:  # no broker (yet)
                answers[prompt] = {}
        return answers
    finally:
        await bus.close()


def poll(url: str, condition, timeout_s: float) -> tuple[dict, float]:
    start = time.monotonic()
    while True:
        answers = asyncio.run(lookups(url))
        if condition(answers):
            return answers, time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s}s: {answers}"
        time.sleep(0.1)


def test_served_prompts_are_indexed_rebuilt_after_a_broker_restart_and_dropped_with_their_worker(nats, tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats", nats.url, "--prefill", "2", "--decode", "1")  # caching: default
    try:
        health = up.wait_ready(2, 1)
        roles = {w["worker_id"]: w["role"] for w in health["workers"]}
        decode_id = next(w for w, role in roles.items() if role == "decode")
        with httpx.Client(base_url=f"{up.base_url}/v1", timeout=30) as client:
            for prompt in PROMPTS:
                r = client.post("/completions", json={"model": MOCK_MODEL, "prompt": prompt, "max_tokens": 4,
                                                      "temperature": 0})
                assert r.status_code == 200, r.text

        # Each prompt: one prefill worker (the one that served it) and the decode worker keep all its blocks.
        def indexed(answers: dict) -> bool:
            for prompt, answer in answers.items():
                num_blocks = len(ByteTokenizer().encode(prompt)) // BLOCK_SIZE
                if sorted(roles.get(w) for w in answer) != ["decode", "prefill"]:
                    return False
                if set(answer.values()) != {num_blocks}:
                    return False
            return True

        before, _ = poll(nats.url, indexed, timeout_s=10)

        # SIGKILL the broker: no goodbye, its index is gone with its process. pdserve up restarts it (within a
        # second: too soon for a poll to be sure to see the empty index in between), and the new process, its index
        # empty, asks every worker for a snapshot.
        snapshot_line = "asking every worker for a snapshot"
        num_asked = up.output().count(snapshot_line)
        assert num_asked == 1
        num_snapshots = up.output().count("KV snapshot of")  # one line per worker per snapshot sent
        old_pid = service_pid(up, "kv-broker")
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "kv-broker restarted" not in up.output():
            assert time.monotonic() < deadline, f"the broker was not restarted within 10 s: {up.output()[-2000:]}"
            time.sleep(0.05)
        started = time.monotonic()
        assert service_pid(up, "kv-broker") != old_pid
        after, _ = poll(nats.url, lambda answers: answers == before, timeout_s=REBUILD_DEADLINE_S)
        print(f"index rebuilt {time.monotonic() - started:.2f} s after the broker was restarted")
        # Rebuilt by the new broker's request to every worker, each answering once; not by the per-worker fallback
        # (a worker whose heartbeats announce events the broker never applied), which would also get there in time.
        since_restart = up.output().split("kv-broker restarted", 1)[1]
        assert up.output().count(snapshot_line) == num_asked + 1
        assert up.output().count("KV snapshot of") == num_snapshots + len(roles)
        assert "; asking for a snapshot" not in since_restart

        # The decode worker stops: its goodbye drops it from the index.
        decode_pid = service_pid(up, "decode-worker")
        os.kill(decode_pid, signal.SIGTERM)
        poll(nats.url, lambda answers: all(decode_id not in a and len(a) == 1 for a in answers.values()), timeout_s=10)
        deadline = time.monotonic() + 10
        while alive(decode_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(decode_pid)
    finally:
        up.stop()
        left = up.kill_leftovers()
        assert not left, f"processes left after pdserve up stopped: {left}"
