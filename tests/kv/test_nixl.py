"""The nixl path's own behaviour (the transfer behaviour suite in test_transfer.py runs over it too): who gets the
NIXL metadata, what a peer without it can read, when the path is offered and chosen, and READs in flight when the
prefill process freezes or dies. Real NIXL agents over UCX's TCP transport (this machine has no RDMA device)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest
import zmq

from pdserve import rdma_devices
from pdserve.kv import ArrayBlockPool, TransferClient, TransferEndpoint, TransferError, TransferRefused
from pdserve.kv import nixl_path
from pdserve.kv.host import host_id
from pdserve.kv.pool import batch_iov
from pdserve.kv.read_fence import ReadFence
from tests.kv.ucx import UCX_TCP

pytestmark = pytest.mark.skipif(nixl_path.why_unavailable() is not None,
                                reason=f"NIXL does not load here: {nixl_path.why_unavailable()}")

TAG = "test-model/float16/bs16"
TOKEN = "s3cret-token"
ALL = ("tcp", "shm", "nixl")


@pytest.fixture(autouse=True)
def ucx_over_tcp(monkeypatch):
    monkeypatch.setenv("UCX_TLS", UCX_TCP)


def make_pool(num_blocks=16, block_nbytes=4096, seed=None) -> ArrayBlockPool:
    if seed is None:
        return ArrayBlockPool([np.zeros((num_blocks, block_nbytes), np.uint8)], layout_tag=TAG)
    rng = np.random.default_rng(seed)
    return ArrayBlockPool([rng.integers(0, 256, (num_blocks, block_nbytes), dtype=np.uint8)], layout_tag=TAG)


@pytest.fixture
def endpoint():
    ep = TransferEndpoint(make_pool(seed=1), bind_host="127.0.0.1", offer_nixl=True)
    ep.start()
    yield ep
    ep.stop()


def raw_pull(address: str, token: str, **extra) -> list[dict]:
    """A pull over the nixl path by hand on one DEALER socket: every header the endpoint answers with."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        sock.send(orjson.dumps({"v": 1, "op": "pull", "nonce": "n1", "transfer_id": "t1", "token": token,
                                "block_ids": [0, 1], "segment_nbytes": [4096], "layout_tag": TAG, "window": 8,
                                "timeout_s": 5, "path": "nixl", **extra}))
        headers = []
        # The first answer may take a GPU endpoint longer (it waits for the KV's producing work, then gathers it).
        while sock.poll(1000 if headers else 10_000):
            headers.append(orjson.loads(sock.recv_multipart()[0]))
        return headers
    finally:
        sock.close()


def test_the_metadata_goes_only_to_a_puller_with_a_valid_token_and_only_once(endpoint):
    endpoint.allow("t1", TOKEN, [0, 1], time.time() + 30)
    (refusal,) = raw_pull(endpoint.address, "wrong-token")
    assert refusal["k"] == "error" and refusal["reason"] == "bad_token" and "md" not in refusal
    (description,) = raw_pull(endpoint.address, TOKEN)
    assert description["k"] == "nixl" and description["md"] and description["agent"].startswith("pdserve-prefill-")
    (again,) = raw_pull(endpoint.address, TOKEN, nixl_agent=description["agent"])
    assert again["k"] == "nixl" and "md" not in again and again["iov"] == description["iov"]


def test_a_peer_without_the_metadata_reads_nothing_and_with_it_only_the_registered_pool(endpoint):
    """The descriptors alone (addresses, as a puller sees them) do not let a NIXL agent read: it needs the metadata,
    which the endpoint hands only to a puller with a valid token. With it, NIXL's reader-side check stops a READ
    outside the registered pool (the module's note says why that check is not a protection in itself)."""
    endpoint.allow("t1", TOKEN, [0, 1], time.time() + 30)
    (description,) = raw_pull(endpoint.address, TOKEN)
    thief_pool = make_pool()
    thief = nixl_path.NixlAgent("thief")
    try:
        thief.register(thief_pool)
        local = batch_iov(thief_pool, [0, 1])
        remote = np.asarray(description["iov"], dtype=np.uint64)
        with pytest.raises(TransferError, match="could not prepare"):
            thief.post_read(description["agent"], local, remote)  # names the agent, has no metadata
        assert thief_pool.block_bytes(0) == bytes(4096)
        name = thief.know(endpoint.address, description["agent"], description["md"])
        outside = remote.copy()
        outside[0, 0] += 16 * 4096  # past the pool's end
        with pytest.raises(TransferError, match="could not prepare"):
            thief.post_read(name, local[:1], outside[:1])
    finally:
        thief.close()


async def test_a_pool_without_fixed_memory_is_not_offered_and_a_nixl_pull_falls_back_to_tcp(caplog):
    class BytearrayPool:  # separate bytearrays: nothing NIXL could register once
        num_blocks, segment_nbytes, layout_tag = 16, (4096,), TAG

        def __init__(self):
            self._blocks = [bytearray([b]) * 4096 for b in range(16)]

        def segments(self, block_id):
            return [memoryview(self._blocks[block_id])]

    with caplog.at_level(logging.WARNING):
        ep = TransferEndpoint(BytearrayPool(), bind_host="127.0.0.1", offer_nixl=True)
    ep.start()
    client = TransferClient(transport="nixl")
    local = make_pool()
    try:
        assert "nixl" not in ep.transports and "no fixed memory" in caplog.text
        ep.allow("t1", TOKEN, [0, 1], time.time() + 30)
        with caplog.at_level(logging.WARNING, logger="pdserve.kv.client"):
            result = await client.pull(ep.address, "t1", TOKEN, [0, 1], local, [3, 4], timeout_s=5,
                                       peer_host_id="another-host", peer_transports=ep.transports)
    finally:
        client.close()
        ep.stop()
    assert result.transport == "tcp" and local.block_bytes(4) == bytes([1]) * 4096
    assert "use tcp instead of nixl" in caplog.text and "does not offer it" in caplog.text
    assert any(k.startswith("nixl->tcp") for k in client.fallbacks)


def test_auto_takes_nixl_across_hosts_only_with_an_active_rdma_port():
    """_rdma_here is stubbed (this machine has no RDMA device): the choice given each answer."""
    client = TransferClient()
    pool = make_pool()
    try:
        client._rdma_active = False
        assert client.choose_path("tcp://10.0.0.2:1", "another-host", ALL, pool) == "tcp"
        client._rdma_active = True
        assert client.choose_path("tcp://10.0.0.2:1", "another-host", ALL, pool) == "nixl"
        assert client.choose_path("tcp://10.0.0.2:1", "another-host", ("tcp",), pool) == "tcp"
        assert client.choose_path("tcp://127.0.0.1:1", host_id(), ALL, pool) == "shm"  # same host: shm wins
    finally:
        client.close()
    assert TransferClient(transport="tcp").choose_path("tcp://10.0.0.2:1", "another-host", ALL, pool) == "tcp"


def test_offered_on_an_open_nats_only_when_asked_for_and_by_auto_only_with_rdma(caplog):
    """rdma_active is given (CI's machine has no RDMA device; rdma_devices is tested on its own)."""
    with caplog.at_level(logging.INFO, logger="pdserve.kv.nixl_path"):
        assert nixl_path.transport_offered("auto", nats_authenticated=True, rdma_active=True)
        assert not nixl_path.transport_offered("auto", nats_authenticated=True, rdma_active=False)
        here = rdma_devices.has_active_port(rdma_devices.list_devices())  # CI's machine: none
        assert nixl_path.transport_offered("auto", nats_authenticated=True) == here
        assert not nixl_path.transport_offered("auto", nats_authenticated=False, rdma_active=True)
        assert "NATS has no credentials" in caplog.text
        caplog.clear()
        assert nixl_path.transport_offered("nixl", nats_authenticated=False)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "whole KV pool" in caplog.text
    assert nixl_path.transport_offered("nixl", nats_authenticated=True, rdma_active=False)
    assert not nixl_path.transport_offered("tcp", nats_authenticated=True, rdma_active=True)


BIG_ENDPOINT = f"""
import time
import numpy as np
from pdserve import rdma_devices
from pdserve.kv import ArrayBlockPool, TransferEndpoint
pool = ArrayBlockPool([np.full((64, 4 << 20), 7, np.uint8)], layout_tag={TAG!r})
ep = TransferEndpoint(pool, bind_host="127.0.0.1", batch_blocks=1, offer_nixl=True)
ep.start()
ep.allow("t1", {TOKEN!r}, list(range(64)), time.time() + 120)
print(ep.address, flush=True)
time.sleep(120)
"""


@pytest.fixture
def big_endpoint():
    """A prefill side in its own process serving 256 MiB in 4 MiB batches: READs are still in flight 50 ms in."""
    proc = subprocess.Popen([sys.executable, "-c", BIG_ENDPOINT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "UCX_TLS": UCX_TCP})
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def pull_under_way(address: str, timeout_s: float, fence: ReadFence | None = None):
    """A nixl pull of the big endpoint's 64 blocks (with a fence: READ straight into them), yielded once its first
    READ landed (the path is up and bytes move): (client, destination pool, block ids, the pull's task)."""
    local = ArrayBlockPool([np.zeros((64, 4 << 20), np.uint8)], layout_tag=TAG)
    client = TransferClient(transport="nixl", window_messages=2)
    ids = list(range(64))
    try:
        pull = asyncio.create_task(client.pull(address, "t1", TOKEN, ids, local, ids, timeout_s=timeout_s,
                                               peer_host_id="another-host", peer_transports=ALL, fence=fence))
        until = time.monotonic() + 10
        while local.block_bytes(0)[:1] != b"\x07":
            assert not pull.done(), pull.exception() if not pull.cancelled() else "cancelled"
            assert time.monotonic() < until, "no block landed within 10 s"
            await asyncio.sleep(0.002)
        yield client, local, ids, pull
    finally:
        client.close()


async def test_a_frozen_prefill_process_fails_the_pull_at_its_deadline_and_writes_nothing_after(big_endpoint):
    proc, address = big_endpoint
    try:
        async with pull_under_way(address, timeout_s=2.0) as (client, local, ids, pull):
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(TransferError, match="timeout_s=2.0"):
                await pull
            assert time.monotonic() - started < 2.5
            snapshot = [local.block_bytes(b) for b in ids]
            assert client._landings[None].num_held > 0  # READs still in flight into landing buffers, not into the blocks
            os.kill(proc.pid, signal.SIGCONT)  # READs it had not answered must not land in the blocks now
            await asyncio.sleep(0.5)
            assert [local.block_bytes(b) for b in ids] == snapshot
            assert any(s[:1] == b"\x00" for s in snapshot)  # it did stop mid-way
            assert client._landings[None].num_held == 0  # their buffers free again once those READs ended
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def test_read_into_the_blocks_a_frozen_prefill_leaves_its_reads_to_the_fence(big_endpoint):
    """With a fence the READs land in the blocks themselves. The pull still fails at its deadline; the READs the
    frozen process had not answered stay in the fence, and they do land in the blocks once it runs again: that is
    why their owner must hold the blocks until the fence has ended (read_fence.py)."""
    proc, address = big_endpoint
    fence = ReadFence()
    try:
        async with pull_under_way(address, timeout_s=2.0, fence=fence) as (client, local, ids, pull):
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(TransferError, match="timeout_s=2.0"):
                await pull
            assert time.monotonic() - started < 2.5
            assert None not in client._landings  # no landing buffer was used
            assert fence.num_in_flight > 0 and not fence.ended()
            landed = sum(local.block_bytes(b).count(7) for b in ids)
            assert landed < 64 * (4 << 20)  # it did stop mid-way
            os.kill(proc.pid, signal.SIGCONT)
            assert await asyncio.to_thread(fence.wait, 10.0), "the READs did not end once the prefill process ran"
            assert sum(local.block_bytes(b).count(7) for b in ids) > landed  # late bytes, in the blocks
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("fenced", [False, True], ids=["landing", "into-the-blocks"])
async def test_a_killed_prefill_process_fails_the_pull_at_once(big_endpoint, fenced):
    proc, address = big_endpoint
    fence = ReadFence() if fenced else None
    async with pull_under_way(address, timeout_s=20, fence=fence) as (_, _, _, pull):
        proc.kill()
        killed = time.monotonic()
        with pytest.raises(TransferError) as info:
            await pull
        assert time.monotonic() - killed < 1.5, info.value  # not the pull's 20 s: decode recomputes at once
        assert not isinstance(info.value, TransferRefused)
        if fenced:  # its READs failed with it: the blocks are free at once
            assert fence.ended()


EXITS_CLEANLY = f"""
import asyncio, time
import numpy as np
from pdserve.kv import ArrayBlockPool, TransferClient, TransferEndpoint

async def main():
    ep = TransferEndpoint(ArrayBlockPool([np.ones((4, 4096), np.uint8)], layout_tag={TAG!r}), bind_host="127.0.0.1",
                          offer_nixl=True)
    ep.start()
    ep.allow("t1", {TOKEN!r}, [0, 1], time.time() + 30)
    client = TransferClient(transport="nixl")
    result = await client.pull(ep.address, "t1", {TOKEN!r}, [0, 1], ArrayBlockPool([np.zeros((4, 4096), np.uint8)],
                               layout_tag={TAG!r}), [2, 3], timeout_s=5, peer_host_id="x", peer_transports=ep.transports)
    assert result.transport == "nixl", result
    ep.stop()  # the client is left open: the process's exit closes its agent

asyncio.run(main())
"""


def test_a_process_that_used_nixl_exits_cleanly():
    """Every process that had made a UCX agent died at exit (SIGSEGV in the wheel's bundled libnl-route, loaded by
    UCX's InfiniBand module) until nixl_path kept that module out on hosts without RDMA devices."""
    done = subprocess.run([sys.executable, "-c", EXITS_CLEANLY], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "UCX_TLS": UCX_TCP})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
