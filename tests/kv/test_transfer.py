"""TransferEndpoint / TransferClient over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pdserve.kv import (
    ArrayBlockPool,
    LayoutMismatch,
    TransferClient,
    TransferEndpoint,
    TransferError,
    TransferIntegrityError,
    TransferRefused,
    TransferTimeout,
)
from pdserve.kv.host import host_id
from pdserve.kv.pool import BatchStream, batch_pieces, segment_checksums
from pdserve.kv.read_fence import ReadFence
from tests.kv.ucx import UCX_TCP

TAG = "test-model/float16/bs16"
TOKEN = "s3cret-token"
SLACK_S = 0.3  # how late past timeout_s a TransferTimeout may come


def make_pool(segment_nbytes=(4096,), num_blocks=16, seed=None, tag=TAG) -> ArrayBlockPool:
    """One uint8 array per segment; filled with random bytes when `seed` is given, zeros otherwise."""
    rng = np.random.default_rng(seed)
    if seed is None:
        return ArrayBlockPool([np.zeros((num_blocks, n), np.uint8) for n in segment_nbytes], layout_tag=tag)
    return ArrayBlockPool([rng.integers(0, 256, (num_blocks, n), dtype=np.uint8) for n in segment_nbytes], tag)


class BytearrayPool:
    """A BlockPool that is not an ArrayBlockPool (no segment_span): one bytearray per block and segment."""

    def __init__(self, segment_nbytes, num_blocks, layout_tag=TAG):
        self.num_blocks, self.segment_nbytes, self.layout_tag = num_blocks, tuple(segment_nbytes), layout_tag
        self._blocks = [[bytearray(n) for n in segment_nbytes] for _ in range(num_blocks)]

    def segments(self, block_id):
        return [memoryview(seg) for seg in self._blocks[block_id]]

    def block_bytes(self, block_id):
        return b"".join(self._blocks[block_id])


class SlowPool(BytearrayPool):
    """A decode side that takes 50 ms per block (segments() is asked once per block): a pull is still running."""

    def segments(self, block_id):
        time.sleep(0.05)
        return super().segments(block_id)


def endpoint_kwargs(path: str) -> dict:
    """What an endpoint needs to serve the path: nixl is offered only when asked for (the worker decides)."""
    return {"offer_nixl": True} if path.startswith("nixl") else {}


@pytest.fixture
def endpoints(request):
    """make(pool, **kw) -> started endpoint (serving the test's path, where it has one); all stopped at the end."""
    path = request.getfixturevalue("path") if "path" in request.fixturenames else "tcp"
    started = []

    def make(pool, **kwargs):
        ep = TransferEndpoint(pool, bind_host="127.0.0.1", **endpoint_kwargs(path), **kwargs)
        ep.start()
        started.append(ep)
        return ep

    yield make
    for ep in started:
        ep.stop()


class PathClient:
    """A TransferClient that pulls over one path (the test's parameter) and checks that it did: the behaviour
    suite runs over every path this machine has, unchanged. "tcp" is the tcp path as clients take it (the bytes on
    the endpoint's TCP stream); "tcp-frames", the same path with the bytes as ZeroMQ frames (a client that cannot
    reach the stream port); "nixl", a NIXL READ over UCX's TCP transport (this machine has no RDMA device) into
    landing buffers, checked there and copied into the blocks; "nixl-direct", the same with a ReadFence: READ
    straight into the blocks of pools NIXL can register (the others land as without one), confirmed by the
    endpoint."""

    def __init__(self, path: str, **kwargs):
        self.path = {"tcp-frames": "tcp", "nixl-direct": "nixl"}.get(path, path)
        self.fenced = path == "nixl-direct"
        self._client = TransferClient(transport=self.path, tcp_stream=path != "tcp-frames", **kwargs)

    async def pull(self, *args, **kwargs):
        if self.fenced:
            kwargs.setdefault("fence", ReadFence())
        result = await self._client.pull(*args, peer_host_id=host_id(), peer_transports=("tcp", "shm", "nixl"),
                                         **kwargs)
        assert result.transport == self.path
        return result

    def close(self):
        self._client.close()

    def __getattr__(self, name):  # the rest of the client, for tests that look inside
        return getattr(self._client, name)


@pytest.fixture(params=["tcp", "tcp-frames", "shm", "nixl", "nixl-direct"])
def path(request, monkeypatch):
    if request.param.startswith("nixl"):
        monkeypatch.setenv("UCX_TLS", UCX_TCP)  # UCX's TCP transport, as between hosts without RDMA NICs
    return request.param


def skip_for_nixl(path: str) -> None:
    if path.startswith("nixl"):
        pytest.skip("nixl serves a pool's fixed memory, registered once, and this pool of separate bytearrays has "
                    "none (the endpoint does not offer nixl then: tested in test_nixl.py)")


@pytest.fixture
def make_client(path):
    made = []

    def make(**kwargs):
        made.append(PathClient(path, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(make_client):
    return make_client()


def allow(ep, transfer_id="t1", block_ids=range(16), token=TOKEN, ttl_s=30.0):
    ep.allow(transfer_id, token, list(block_ids), time.time() + ttl_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- correct bytes


@pytest.mark.parametrize(
    "segment_nbytes",
    [(4096,), (300_000,), (40_000, 40_000, 100), (70_000, 10, 70_000, 1000), (1_500_000, 700_000)],
    ids=["small", "zero-copy", "coalesced", "mixed", "multi-message-batches"],
)
async def test_pull_lands_each_remote_block_in_its_local_block(endpoints, client, segment_nbytes):
    remote = make_pool(segment_nbytes, seed=1)
    local = make_pool(segment_nbytes, num_blocks=20)
    ep = endpoints(remote, batch_blocks=3)  # 7 blocks -> batches of 3, 3, 1
    remote_ids, local_ids = [9, 2, 15, 0, 7, 8, 3], [1, 19, 4, 0, 12, 5, 6]
    allow(ep, block_ids=remote_ids)

    result = await client.pull(ep.address, "t1", TOKEN, remote_ids, local, local_ids, timeout_s=5)

    for r, l in zip(remote_ids, local_ids):
        assert local.block_bytes(l) == remote.block_bytes(r)
    untouched = set(range(20)) - set(local_ids)
    assert all(local.block_bytes(b) == bytes(sum(segment_nbytes)) for b in untouched)
    assert result.num_blocks == 7 and result.num_bytes == 7 * sum(segment_nbytes) and result.seconds > 0
    assert ep.stats()["num_blocks_sent"] == 7
    # the endpoint counts a pull served right after handing its last message to zmq: the client may be first
    await wait_until(lambda: ep.stats()["num_transfers_served"] == 1)


async def test_multi_array_pool_of_typed_arrays(endpoints, client):
    """Engine-shaped arrays (per-layer K and V, float16) are served as raw bytes, segment per array."""
    rng = np.random.default_rng(2)
    remote_arrays = [rng.standard_normal((8, 16, 2, 64)).astype(np.float16) for _ in range(4)]
    local_arrays = [np.zeros_like(a) for a in remote_arrays]
    remote, local = ArrayBlockPool(remote_arrays, TAG), ArrayBlockPool(local_arrays, TAG)
    assert remote.segment_nbytes == (4096,) * 4
    ep = endpoints(remote)
    allow(ep, block_ids=[3, 4, 5])

    await client.pull(ep.address, "t1", TOKEN, [3, 4, 5], local, [0, 1, 2], timeout_s=5)

    for r, l in zip(remote_arrays, local_arrays):
        np.testing.assert_array_equal(l[:3], r[3:6])
        assert not l[3:].any()


@pytest.mark.parametrize("direction", ["array-to-bytearray", "bytearray-to-array"])
async def test_pools_without_segment_span_interoperate(endpoints, client, direction, path):
    """One end cuts the stream into per-block pieces, the other into runs of consecutive blocks."""
    if direction == "bytearray-to-array":
        skip_for_nixl(path)
    segment_nbytes = (30_000, 5000)
    array_pool = make_pool(segment_nbytes, seed=20)
    plain_pool = BytearrayPool(segment_nbytes, 16)
    for b in range(16):
        for seg, src in zip(plain_pool.segments(b), array_pool.segments(b)):
            seg[:] = src
        array_pool.segments(b)[0][:1] = bytes([b])  # the two pools differ, so the right source is checked
    remote, local = (array_pool, BytearrayPool(segment_nbytes, 16)) if direction == "array-to-bytearray" else (
        plain_pool, make_pool(segment_nbytes))
    ep = endpoints(remote, batch_blocks=4)
    ids = [3, 4, 5, 6, 7, 9, 10, 0]
    allow(ep, block_ids=ids)
    await client.pull(ep.address, "t1", TOKEN, ids, local, [1, 2, 3, 4, 5, 6, 7, 8], timeout_s=5)
    assert [local.block_bytes(b) for b in range(1, 9)] == [remote.block_bytes(b) for b in ids]


async def test_sequential_pulls_reuse_one_connection(endpoints, client):
    remote, local = make_pool(seed=21), make_pool()
    ep = endpoints(remote)
    for i in range(3):
        allow(ep, f"t{i}", block_ids=[i])
        await client.pull(ep.address, f"t{i}", TOKEN, [i], local, [i], timeout_s=5)
        assert local.block_bytes(i) == remote.block_bytes(i)
    assert len(client._idle[ep.address]) == 1


async def test_pull_of_a_subset_of_the_allowed_blocks(endpoints, client):
    remote, local = make_pool(seed=3), make_pool()
    ep = endpoints(remote)
    allow(ep, block_ids=[1, 2, 3, 4])
    await client.pull(ep.address, "t1", TOKEN, [4, 2], local, [0, 1], timeout_s=5)
    assert local.block_bytes(0) == remote.block_bytes(4) and local.block_bytes(1) == remote.block_bytes(2)


async def test_on_pull_sees_traceparent_sizes_and_path(endpoints, client, path):
    seen = []
    ep = endpoints(make_pool(seed=4), on_pull=lambda *args: seen.append(args))
    allow(ep, block_ids=[0, 1])
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.pull(ep.address, "t1", TOKEN, [0, 1], make_pool(), [0, 1], timeout_s=5, traceparent=tp)
    for _ in range(50):  # the callback runs on the endpoint thread, just after the last batch is queued
        if seen:
            break
        await asyncio.sleep(0.01)
    ((transfer_id, traceparent, num_blocks, num_bytes, seconds, transport),) = seen
    assert (transfer_id, traceparent, num_blocks, num_bytes, transport) == ("t1", tp, 2, 2 * 4096, client.path)
    assert seconds >= 0


async def test_many_concurrent_pulls_from_one_endpoint(endpoints, make_client):
    remote = make_pool((50_000, 3000), num_blocks=64, seed=5)
    local = make_pool((50_000, 3000), num_blocks=64)
    ep = endpoints(remote, batch_blocks=2)
    # Fewer threads than pulls, so some wait their turn; one message of credit, so every message waits for one.
    client = make_client(max_concurrent_pulls=8, window_messages=1)
    try:
        pulls = []
        for i in range(32):
            remote_ids, local_ids = [2 * i, 2 * i + 1], [63 - 2 * i, 62 - 2 * i]
            allow(ep, f"t{i}", remote_ids)
            pulls.append(client.pull(ep.address, f"t{i}", TOKEN, remote_ids, local, local_ids, timeout_s=10))
        results = await asyncio.gather(*pulls)
    finally:
        client.close()
    assert [r.num_blocks for r in results] == [2] * 32
    for i in range(64):
        assert local.block_bytes(63 - i) == remote.block_bytes(i)
    await wait_until(lambda: ep.stats()["num_transfers_served"] == 32)


# --------------------------------------------------------------------------------------------- refusals


async def pull_refused(ep, client, transfer_id="t1", token=TOKEN, remote_ids=(0, 1)):
    local = make_pool()
    with pytest.raises(TransferRefused) as info:
        await client.pull(ep.address, transfer_id, token, list(remote_ids), local, [5, 6], timeout_s=5)
    return info.value, local


@pytest.mark.parametrize("token", ["wrong-token", ""], ids=["wrong", "missing"])
async def test_bad_token_gets_no_bytes(endpoints, client, token):
    ep = endpoints(make_pool(seed=6))
    allow(ep, block_ids=[0, 1])
    err, local = await pull_refused(ep, client, token=token)
    assert err.reason == "bad_token" and "token" in str(err)
    assert not any(local.block_bytes(b).strip(b"\0") for b in range(16))
    assert ep.stats()["num_bytes_sent"] == 0 and ep.stats()["num_transfers_refused"] == 1


async def test_unknown_transfer_refused(endpoints, client):
    ep = endpoints(make_pool(seed=7))
    err, _ = await pull_refused(ep, client, transfer_id="never-allowed")
    assert err.reason == "unknown"


async def test_released_transfer_refused(endpoints, client):
    ep = endpoints(make_pool(seed=8))
    allow(ep, block_ids=[0, 1])
    assert ep.release("t1") is True
    assert ep.release("t1") is False and ep.release("other") is False
    err, _ = await pull_refused(ep, client)
    assert err.reason == "released"


async def test_release_during_a_pull_stops_it(endpoints, make_client, path):
    # 64 MiB: more than the kernel's socket buffers can hold (4 MiB to send, 32 MiB to receive at most here), so
    # that the tcp stream is still sending when the release comes.
    num_blocks, block_nbytes = 16, 4 << 20
    ep = endpoints(make_pool((block_nbytes,), num_blocks=num_blocks, seed=15), batch_blocks=1)
    allow(ep, block_ids=range(num_blocks))
    client = make_client(window_messages=1)
    ids = list(range(num_blocks))
    try:
        task = asyncio.create_task(
            client.pull(ep.address, "t1", TOKEN, ids, SlowPool((block_nbytes,), num_blocks), ids, timeout_s=5))
        while ep.stats()["num_bytes_sent"] == 0:
            await asyncio.sleep(0.005)
        assert ep.release("t1")
        sent_at_release = ep.stats()["num_bytes_sent"]
        with pytest.raises(TransferRefused) as info:
            await task
    finally:
        client.close()
    assert info.value.reason == "released"
    assert ep.stats()["num_bytes_sent"] == sent_at_release < num_blocks * block_nbytes


async def test_expired_transfer_refused(endpoints, client):
    ep = endpoints(make_pool(seed=9))
    allow(ep, block_ids=[0, 1], ttl_s=-1.0)
    err, _ = await pull_refused(ep, client)
    assert err.reason == "expired" and "lease" in str(err)


async def test_block_outside_the_allowed_set_refused(endpoints, client):
    ep = endpoints(make_pool(seed=10))
    allow(ep, block_ids=[0, 1])
    err, local = await pull_refused(ep, client, remote_ids=(1, 2))
    assert err.reason == "bad_block" and "[2]" in str(err)
    assert ep.stats()["num_bytes_sent"] == 0


@pytest.mark.parametrize("local_segments,local_tag", [((2048, 2048), TAG), ((4096,), "other-model/bfloat16/bs16")])
async def test_layout_mismatch_refused_with_clear_message(endpoints, client, local_segments, local_tag):
    ep = endpoints(make_pool((4096,), seed=11))
    allow(ep, block_ids=[0])
    local = make_pool(local_segments, tag=local_tag)
    with pytest.raises(LayoutMismatch) as info:
        await client.pull(ep.address, "t1", TOKEN, [0], local, [0], timeout_s=5)
    message = str(info.value)
    assert "prefill has 1 segment(s) of 4096 B" in message and "decode has" in message
    assert "both sides must run the same model, dtype and block size" in message
    assert ep.stats()["num_bytes_sent"] == 0


async def test_block_count_mismatch_rejected_before_sending(client):
    with pytest.raises(TransferError, match="one local block per remote block"):
        await client.pull("tcp://127.0.0.1:1", "t1", TOKEN, [0, 1], make_pool(), [0], timeout_s=1)


async def test_malformed_address_is_a_transfer_error(client):
    with pytest.raises(TransferError, match="tcp://host:port"):
        await client.pull("127.0.0.1:5555", "t1", TOKEN, [0], make_pool(), [0], timeout_s=1)


# --------------------------------------------------------------------------------------------- failures


async def test_corruption_detected(endpoints, client, path):
    ep = endpoints(make_pool((100_000,), seed=12))
    allow(ep, block_ids=[0, 1, 2])
    if path == "nixl-direct":
        # READ straight into the blocks, no checksums: what this path can detect is the prefill side letting the
        # blocks go (and maybe reuse them) while they were read. Released once every batch was described and
        # READ: no refusal can come then, only the endpoint's answer to the client's "done".
        on_done = ep._on_done

        def release_then_answer(identity, header):
            ep.release("t1")
            on_done(identity, header)

        ep._on_done = release_then_answer
        with pytest.raises(TransferIntegrityError, match="released it while its blocks were being copied"):
            await client.pull(ep.address, "t1", TOKEN, [0, 1, 2], make_pool((100_000,)), [0, 1, 2], timeout_s=5)
        return
    ep._corrupt_next_send_for_tests()
    with pytest.raises(TransferIntegrityError, match="checksum"):
        await client.pull(ep.address, "t1", TOKEN, [0, 1, 2], make_pool((100_000,)), [0, 1, 2], timeout_s=5)


async def test_timeout_when_endpoint_stalls_then_next_pull_is_clean(endpoints, client):
    remote, local = make_pool(seed=13), make_pool()
    ep = endpoints(remote)
    allow(ep, block_ids=[0, 1])
    ep.pause_for_tests(0.8)
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="timeout_s=0.4"):
        await client.pull(ep.address, "t1", TOKEN, [0, 1], local, [0, 1], timeout_s=0.4)
    elapsed = time.monotonic() - start
    ticker.cancel()
    assert 0.4 <= elapsed < 0.4 + SLACK_S
    assert ticks >= 15  # the event loop kept running while the pull waited
    assert local.block_bytes(0) == bytes(4096)

    # The stalled endpoint answers the timed-out pull late; that answer must not reach the next pull.
    await asyncio.sleep(0.6)
    await client.pull(ep.address, "t1", TOKEN, [1, 0], local, [0, 1], timeout_s=5)
    assert local.block_bytes(0) == remote.block_bytes(1) and local.block_bytes(1) == remote.block_bytes(0)


async def test_timeout_when_nothing_listens(client):
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="reachable"):
        await client.pull(f"tcp://127.0.0.1:{free_port()}", "t1", TOKEN, [0], make_pool(), [0], timeout_s=0.5)
    assert 0.5 <= time.monotonic() - start < 0.5 + SLACK_S


STALLED_ENDPOINT = f"""
import time
import numpy as np
from pdserve.kv import ArrayBlockPool, TransferEndpoint
ep = TransferEndpoint(ArrayBlockPool([np.ones((4, 4096), np.uint8)], layout_tag={TAG!r}), bind_host="127.0.0.1")
ep.start()
ep.allow("t1", {TOKEN!r}, [0, 1, 2, 3], time.time() + 60)
ep.pause_for_tests(60)  # takes the pull, sends nothing: a prefill worker that hangs, then is killed
print(ep.address, flush=True)
time.sleep(60)
"""


async def test_pull_fails_at_once_when_the_endpoint_process_is_killed(client, path):
    proc = subprocess.Popen([sys.executable, "-c", STALLED_ENDPOINT], stdout=subprocess.PIPE, text=True)
    try:
        address = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip()
        assert address.startswith("tcp://"), address
        pull = asyncio.create_task(client.pull(address, "t1", TOKEN, [0, 1, 2, 3], make_pool(num_blocks=4),
                                               [0, 1, 2, 3], timeout_s=20))
        await asyncio.sleep(0.5)
        assert not pull.done()  # waiting on the stalled endpoint
        killed = time.monotonic()
        proc.kill()
        with pytest.raises(TransferError, match="closed the connection after 0 of 4 blocks"):
            await asyncio.wait_for(pull, 5)
        assert time.monotonic() - killed < 1.0  # not timeout_s: decode recomputes at once
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # the client is fine afterwards: a pull from a live endpoint on a new connection works
    ep = TransferEndpoint(make_pool(seed=3), bind_host="127.0.0.1", **endpoint_kwargs(path))
    ep.start()
    try:
        allow(ep, block_ids=[0])
        await client.pull(ep.address, "t1", TOKEN, [0], make_pool(), [0], timeout_s=5)
    finally:
        ep.stop()


async def test_a_stopped_endpoint_is_not_taken_for_a_dropped_pull(endpoints, client):
    """The pooled connection to an endpoint that has stopped since is discarded, not reused: a later pull to
    that address waits for its deadline like any pull to an address nobody listens on."""
    ep = endpoints(make_pool(seed=4))
    allow(ep, block_ids=[0])
    await client.pull(ep.address, "t1", TOKEN, [0], make_pool(), [0], timeout_s=5)
    ep.stop()
    await asyncio.sleep(0.3)
    with pytest.raises(TransferTimeout, match="reachable"):
        await client.pull(ep.address, "t1", TOKEN, [0], make_pool(), [0], timeout_s=0.5)


async def test_cancelled_pull_stops_promptly(endpoints, client):
    ep = endpoints(make_pool(seed=14))
    allow(ep, block_ids=[0])
    ep.pause_for_tests(2.0)
    task = asyncio.create_task(client.pull(ep.address, "t1", TOKEN, [0], make_pool(), [0], timeout_s=10))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - start < 0.3


async def test_stop_is_prompt_idempotent_and_idle_cheap():
    ep = TransferEndpoint(make_pool(), bind_host="127.0.0.1")
    ep.start()
    assert ep.address.startswith("tcp://127.0.0.1:") and not ep.address.endswith(":0")
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(0.5)
    assert time.process_time() - cpu < 0.05, "an idle endpoint must block in poll, not spin"
    start = time.monotonic()
    ep.stop()
    assert time.monotonic() - start < 0.3
    ep.stop()


# --------------------------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [5, 2, 9], [7, 8, 1, 2, 3]])
def test_batch_stream_checksums_equal_segment_checksums(ids):
    pool = make_pool((3000, 70_000, 12), seed=30)
    stream = BatchStream(pool, ids)
    for _ in stream.walk(stream.nbytes_left // 3):  # odd cut points, across pieces and segments
        pass
    for _ in stream.walk(stream.nbytes_left):
        pass
    assert stream.checksums() == segment_checksums(pool, ids)


def test_subclass_overriding_only_segments_is_not_read_through_spans():
    class Staged(ArrayBlockPool):
        def segments(self, block_id):
            return super().segments(self.num_blocks - 1 - block_id)

    pool = Staged([np.arange(4 * 8, dtype=np.uint8).reshape(4, 8)])
    views = [view for view, _, _ in batch_pieces(pool, [0, 1])]
    assert [bytes(v) for v in views] == [pool.block_bytes(0), pool.block_bytes(1)]


async def wait_until(condition, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
