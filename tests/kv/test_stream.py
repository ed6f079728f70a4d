"""The tcp path's byte stream (kv/stream.py) over real sockets on 127.0.0.1: what only the stream has. The
transfer behaviour suite (test_transfer.py) runs over it too, as its "tcp" path."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import orjson
import pytest
import zmq

from pdserve.kv import TransferClient, TransferEndpoint, TransferError, TransferRefused
from pdserve.kv import stream

from tests.kv.test_transfer import TOKEN, SlowPool, allow, endpoints, free_port, make_pool  # noqa: F401 (fixture)


@pytest.fixture
def client():
    c = TransferClient(transport="tcp", tcp_stream=True)
    yield c
    c.close()


def idle_connection(client, ep):
    (conn,) = client._idle[ep.address]
    return conn


async def test_pulls_go_on_the_stream_and_reuse_it(endpoints, client):
    remote = make_pool((4096, 1000), num_blocks=8, seed=1)
    ep = endpoints(remote)
    allow(ep, block_ids=range(8))
    local = make_pool((4096, 1000), num_blocks=8)
    await client.pull(ep.address, "t1", TOKEN, [3, 1, 7], local, [0, 5, 2], timeout_s=5)
    first = idle_connection(client, ep).stream
    assert first is not None and first.getpeername()[1] == ep._streams.port
    await client.pull(ep.address, "t1", TOKEN, [0, 2], local, [1, 3], timeout_s=5)
    assert idle_connection(client, ep).stream is first  # one stream per connection, kept warm
    assert [local.block_bytes(b) for b in (0, 5, 2, 1, 3)] == [remote.block_bytes(b) for b in (3, 1, 7, 0, 2)]
    assert not client.fallbacks


async def test_unreachable_stream_port_falls_back_to_frames_with_one_warning(endpoints, client, caplog):
    remote = make_pool(seed=2)
    ep = endpoints(remote)
    allow(ep)
    ep._streams.port = free_port()  # what a firewall that lets only the control port through looks like
    local = make_pool()
    with caplog.at_level(logging.WARNING, logger="pdserve.kv.client"):
        for ids in ([0, 1], [2, 3]):
            result = await client.pull(ep.address, "t1", TOKEN, ids, local, ids, timeout_s=5)
            assert result.transport == "tcp"
    assert [local.block_bytes(b) for b in range(4)] == [remote.block_bytes(b) for b in range(4)]
    warnings = [r.getMessage() for r in caplog.records if "ZeroMQ frames" in r.getMessage()]
    assert len(warnings) == 1 and "byte stream" in warnings[0], warnings
    assert sum(client.fallbacks.values()) == 1
    assert idle_connection(client, ep).stream is None


async def test_endpoint_without_a_stream_serves_frames_silently(endpoints, client, caplog):
    remote = make_pool(seed=3)
    ep = endpoints(remote, offer_stream=False)
    allow(ep)
    local = make_pool()
    with caplog.at_level(logging.WARNING):
        await client.pull(ep.address, "t1", TOKEN, [0], local, [0], timeout_s=5)
    assert local.block_bytes(0) == remote.block_bytes(0)
    assert not client.fallbacks and not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_wrong_ticket_gets_nothing(endpoints):
    ep = endpoints(make_pool(seed=4))
    with socket.create_connection(("127.0.0.1", ep._streams.port), timeout=5) as sock:
        sock.sendall(b"x" * stream.TICKET_NBYTES)
        assert sock.recv(1) == b""  # closed without an acknowledgement


def test_a_stream_serves_only_the_connection_it_was_given_to(endpoints):
    """A pull that names another connection's stream is refused: the ticket is bound to the control connection
    that asked for it."""
    ep = endpoints(make_pool(seed=5))
    allow(ep, block_ids=[0])
    ctx = zmq.Context()
    owner, other = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (owner, other):
            s.linger = 0
            s.rcvtimeo = 5000
            s.connect(ep.address)
        owner.send(orjson.dumps({"op": "hello", "nonce": "n1"}))
        hello = orjson.loads(owner.recv())
        with stream.connect("127.0.0.1", hello["port"], bytes.fromhex(hello["ticket"]), 5, 0.05):
            other.send(orjson.dumps({"v": 1, "op": "pull", "nonce": "n2", "transfer_id": "t1", "token": TOKEN,
                                     "block_ids": [0], "segment_nbytes": [4096], "layout_tag": ep.pool.layout_tag,
                                     "path": "tcp", "stream": hello["ticket"]}))
            reply = orjson.loads(other.recv())
    finally:
        owner.close()
        other.close()
        ctx.term()
    assert reply["k"] == "error" and reply["reason"] == "path", reply


async def test_endpoint_stopping_mid_stream_fails_the_pull_at_once(endpoints, client):
    num_blocks, block_nbytes = 16, 4 << 20
    ep = endpoints(make_pool((block_nbytes,), num_blocks=num_blocks, seed=6), batch_blocks=1)
    allow(ep, block_ids=range(num_blocks))
    ids = list(range(num_blocks))
    task = asyncio.create_task(
        client.pull(ep.address, "t1", TOKEN, ids, SlowPool((block_nbytes,), num_blocks), ids, timeout_s=30))
    while ep.stats()["num_bytes_sent"] == 0:
        await asyncio.sleep(0.005)
    stopped = time.monotonic()
    await asyncio.to_thread(ep.stop)
    with pytest.raises(TransferError, match="closed the connection") as info:
        await asyncio.wait_for(task, 5)
    assert not isinstance(info.value, TransferRefused)
    assert time.monotonic() - stopped < 1.0  # not timeout_s: decode recomputes at once
