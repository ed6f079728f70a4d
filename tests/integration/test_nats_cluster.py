"""A NATS cluster of three nodes on 127.0.0.1, every service given all three URLs:

- kill -9 of the node the router is connected to while 8 streams run: the router reconnects to another node,
  every stream ends with all its tokens, exactly the engine's (a resumed one loses and repeats nothing), and a
  second batch is served; then the same for the node of a decode worker that is streaming;
- `pdserve up --nats-cluster 3` comes up with three NATS URLs, serves, and after kill -9 of the node its router
  is connected to (found by the up process's children, never by name) still serves, and restarts that node.
Real nats-servers, real services as subprocesses (each in its own process group, stopped by pid).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import time
from dataclasses import dataclass

import openai
import pytest

from pdserve import config as cfg
from pdserve import nats_cluster
from pdserve.config import MOCK_MODEL
from pdserve.engine.mock_model import predict
from pdserve.nats_server import NatsServer
from pdserve.protocol import SamplingParams
from pdserve.tokenizer import ByteTokenizer
from tests.e2e.conftest import PdserveUp, Service, descendants, free_port, get_json

pytestmark = pytest.mark.e2e

NUM_STREAMS = 8
MAX_TOKENS = 60
MS_PER_DECODE_STEP = 50  # 60 tokens: a stream runs ~3 s, long enough to kill a node under it
CLIENT_TIMEOUT_S = 30.0  # a stream still open after this is hung
TOKENS_BEFORE_KILL = 10  # the node dies mid-decode (the mock's tokens are one character each)
WORKER_ENV = {"PDSERVE_MOCK_MS_PER_DECODE_STEP": str(MS_PER_DECODE_STEP), "PDSERVE_HEARTBEAT_INTERVAL_S": "0.5"}
# A chunk lost with a dying node is noticed at the next chunk (a gap); a lost last chunk only by the stream's
# idle deadline: 5 s here instead of 30 keeps the test short.
ROUTER_ENV = {"PDSERVE_STREAM_IDLE_TIMEOUT_S": "5", "PDSERVE_PREFILL_TIMEOUT_S": "10"}
ROUTER_ID, DECODE_IDS = "router-cluster", ("decode-cluster-a", "decode-cluster-b")


def expected_text(prompt: str) -> str:
    return predict(ByteTokenizer().encode(prompt), SamplingParams(max_tokens=MAX_TOKENS, temperature=0)).text


@dataclass
class Streamed:
    prompt: str
    text: str = ""
    finish_reason: str | None = None
    started: asyncio.Event | None = None


async def stream(client: openai.AsyncOpenAI, record: Streamed) -> Streamed:
    async def consume() -> None:
        chunks = await client.completions.create(model=MOCK_MODEL, prompt=record.prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        async for chunk in chunks:
            for choice in chunk.choices:
                record.text += choice.text
                record.finish_reason = choice.finish_reason or record.finish_reason
            if record.started is not None and len(record.text) >= TOKENS_BEFORE_KILL:
                record.started.set()

    await asyncio.wait_for(consume(), CLIENT_TIMEOUT_S)
    return record


async def run_batch(client: openai.AsyncOpenAI, tag: str, kill=None) -> None:
    """NUM_STREAMS streams; `kill()` is called once every stream has TOKENS_BEFORE_KILL tokens. Every stream must
    end with exactly the engine's text and finish_reason "length"."""
    records = [Streamed(f"{tag} stream {i}: what happens when a NATS node dies? ", started=asyncio.Event())
               for i in range(NUM_STREAMS)]
    tasks = [asyncio.create_task(stream(client, r)) for r in records]
    try:
        if kill is not None:
            await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in records)), 15)
            await asyncio.to_thread(kill)  # the streams go on being read meanwhile
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
    failed = [f"{r.prompt!r}: {o!r}" for r, o in zip(records, outcomes) if isinstance(o, BaseException)]
    assert not failed, "\n".join(failed)
    wrong = [f"{r.prompt!r}: {r.finish_reason} {r.text!r}" for r in records
             if r.finish_reason != "length" or r.text != expected_text(r.prompt)]
    assert not wrong, "\n".join(wrong)


def kill_node(node: NatsServer) -> None:
    os.kill(node.process.pid, signal.SIGKILL)
    node.process.wait(timeout=5)


async def wait_connected_elsewhere(cluster: nats_cluster.NatsCluster, client_name: str, dead: NatsServer) -> NatsServer:
    deadline = time.monotonic() + 10
    while True:
        node = await asyncio.to_thread(cluster.node_of, client_name)
        if node is not None and node is not dead:
            return node
        assert time.monotonic() < deadline, f"{client_name} did not reconnect to another node within 10s"
        await asyncio.sleep(0.1)


def wait_healthy(base_url: str, num_decode: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status, health = get_json(f"{base_url}/health")
        if status == 200 and health and health.get("kv_brokers") and [
                w["role"] for w in health["workers"]].count("decode") == num_decode and any(
                w["role"] == "prefill" for w in health["workers"]):
            return health
        assert time.monotonic() < deadline, f"not healthy within {timeout_s}s: {health}"
        time.sleep(0.2)


async def test_services_move_to_another_node_when_theirs_is_killed_and_every_stream_ends_well(tmp_path):
    cluster = nats_cluster.start_cluster(3, store_dir=str(tmp_path / "nats"), log_dir=str(tmp_path),
                                         die_with_parent=True)
    services: list[Service] = []
    try:
        assert len(set(cluster.urls)) == 3
        port = free_port()
        common = ["--nats", cluster.url]

        def start(name: str, argv: list[str], env: dict | None = None) -> None:
            services.append(Service([*argv, *common], str(tmp_path / f"{name}.log"), env=env))

        start("broker", ["kv-broker", "--broker-id", "broker-cluster"])
        start("prefill", ["prefill-worker", "--engine", "mock", "--worker-id", "prefill-cluster"], WORKER_ENV)
        for worker_id in DECODE_IDS:
            start(worker_id, ["decode-worker", "--engine", "mock", "--worker-id", worker_id], WORKER_ENV)
        start("router", ["router", "--port", str(port), "--router-id", ROUTER_ID], ROUTER_ENV)
        base_url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_healthy, base_url, len(DECODE_IDS))
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0,
                                    timeout=CLIENT_TIMEOUT_S)

        # 1. The router's node dies mid-stream.
        router_node = cluster.node_of(ROUTER_ID)
        assert router_node is not None
        await run_batch(client, "router-node", kill=lambda: kill_node(router_node))
        await wait_connected_elsewhere(cluster, ROUTER_ID, router_node)
        await run_batch(client, "after router-node")
        router_node.restart()
        cluster.wait_formed()

        # 2. A streaming decode worker's node dies (one the router is not on, where there is one).
        def kill_a_decode_workers_node() -> None:
            deadline = time.monotonic() + 5
            while True:  # the router's /health knows what runs from heartbeats (every 0.5 s here)
                _, health = get_json(f"{base_url}/health")
                streaming = [w["worker_id"] for w in health["workers"] if w["role"] == "decode" and w["num_running"]]
                if streaming:
                    break
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            nodes = {worker_id: cluster.node_of(worker_id) for worker_id in streaming}
            router_at = cluster.node_of(ROUTER_ID)
            worker_id = next((w for w, n in nodes.items() if n is not router_at), streaming[0])
            victim["worker_id"], victim["node"] = worker_id, nodes[worker_id]
            kill_node(nodes[worker_id])

        victim: dict = {}
        await run_batch(client, "decode-node", kill=kill_a_decode_workers_node)
        await wait_connected_elsewhere(cluster, victim["worker_id"], victim["node"])
        await run_batch(client, "after decode-node")
        for service in services:
            assert service.process.poll() is None, service.output()[-2000:]
        await client.close()
    finally:
        stuck = []  # Service.stop() kills what ignores SIGTERM, then says so: every service is stopped first
        for service in reversed(services):
            try:
                service.stop()
            except AssertionError as e:
                stuck.append(str(e))
        cluster.stop()
        left = [pid for s in services for pid in s.kill_leftovers()]
        assert not stuck and not left, f"did not stop: {stuck}; processes left behind: {left}"


def node_pids_and_monitors(up: PdserveUp) -> dict[int, str]:
    """pid -> monitoring URL of each nats-server node of `up`, from the ports files in its run directory, kept
    only where the pid is a child of `up` (by pid: never by process name)."""
    children = descendants(up.process.pid)
    found = {}
    for path in glob.glob(str(up.run_dir / "nats-cluster" / "node-*" / "ports" / "*.ports")):
        pid = int(re.search(r"_(\d+)\.ports$", path).group(1))
        if pid in children:
            with open(path) as f:
                found[pid] = json.load(f)["monitoring"][0]
    return found


def connected_names(monitor_url: str) -> list[str]:
    _, connz = get_json(f"{monitor_url}/connz")
    return [c.get("name", "") for c in (connz or {}).get("connections") or []]


def complete(base_url: str, prompt: str, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    if not stream:
        return client.completions.create(model=MOCK_MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(
        model=MOCK_MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)


async def test_pdserve_up_with_a_three_node_cluster_survives_a_node_kill(tmp_path):
    up = PdserveUp(tmp_path, free_port(), "--nats-cluster", "3", "--prefill", "1", "--decode", "1",
                   env={"PDSERVE_MOCK_MS_PER_DECODE_STEP": "20"})
    with up.running(1, 1):
        ready = next(line for line in up.output().splitlines() if "ready:" in line)
        urls = re.search(r"NATS at (\S+)", ready).group(1).split(",")
        assert len(urls) == 3 and all(re.fullmatch(r"nats://127\.0\.0\.1:\d+", u) for u in urls), ready
        assert complete(up.base_url, "before") == expected_text("before")

        nodes = node_pids_and_monitors(up)
        assert len(nodes) == 3, nodes
        _, health = get_json(f"{up.base_url}/health")
        (router_pid,) = [pid for pid, monitor in nodes.items() if health["router_id"] in connected_names(monitor)]

        streams = [asyncio.create_task(asyncio.to_thread(complete, up.base_url, f"during {i}", True)) for i in range(4)]
        await asyncio.sleep(0.5)
        os.kill(router_pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), CLIENT_TIMEOUT_S + 5)
        # Every stream ends with the engine's whole text: a chunk lost with the node is noticed (a gap, or silence
        # after the router reconnected) and the stream resumes on the one decode worker there is, which replaces
        # its earlier attempt (DecodeRequest.attempt).
        assert list(outcomes) == [expected_text(f"during {i}") for i in range(4)], outcomes
        assert [complete(up.base_url, f"after {i}") for i in range(4)] == [expected_text(f"after {i}") for i in range(4)]

        deadline = time.monotonic() + 15
        while not re.search(r"nats-server-\d restarted", up.output()):
            assert time.monotonic() < deadline, up.output()[-3000:]
            await asyncio.sleep(0.2)
        assert "killed by SIGKILL; restarting it" in up.output()
        restarted = node_pids_and_monitors(up)
        assert len(restarted) == 3 and router_pid not in restarted, restarted
        assert complete(up.base_url, "at the end", stream=True) == expected_text("at the end")


@pytest.mark.parametrize("values, problem", [
    ({"nats_cluster": "0"}, "0 nodes is not 1 to 7"),
    ({"nats_cluster": "8"}, "8 nodes is not 1 to 7"),
    ({"nats_cluster": "3", "nats": "nats://h:4222"}, "given together with --nats"),
])
def test_nats_cluster_flag_is_validated_with_the_fix(values, problem):
    with pytest.raises(cfg.ConfigError, match="--nats-cluster / PDSERVE_NATS_CLUSTER: " + problem):
        cfg.build(cfg.UpConfig, values, env={})
