"""What a peer of the KV transfer endpoint can make it hold, and write, is bounded (real ZeroMQ sockets):

- a message larger than any pull request (a 16 MiB frame here, 256 MB in the attack that found this) drops the
  sender's connection before it is held in memory, and the endpoint goes on serving others;
- a peer that sends pull requests and never reads their answers gets no more answers once its queue is full;
- refusals write a bounded number of log lines, with the peer's fields cut short.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import orjson
import zmq

from pdserve.kv import ArrayBlockPool, TransferClient, TransferEndpoint
from pdserve.kv.wire import PROTOCOL_VERSION, SEND_QUEUE_MESSAGES as _SEND_QUEUE_MESSAGES

TAG = "bounds/float16/bs16"
TOKEN = "s3cret-token"


def make_endpoint() -> TransferEndpoint:
    pool = ArrayBlockPool([np.ones((8, 4096), np.uint8)], layout_tag=TAG)
    ep = TransferEndpoint(pool, bind_host="127.0.0.1")
    ep.start()
    ep.allow("good", TOKEN, [0, 1, 2, 3], time.time() + 60)
    return ep


def bad_pull(i: int, transfer_id: str = "nope") -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, "op": "pull", "nonce": f"n{i}", "transfer_id": transfer_id,
                         "token": "x", "block_ids": [0], "segment_nbytes": [4096], "layout_tag": TAG})


async def pull_works(ep: TransferEndpoint) -> None:
    local = ArrayBlockPool([np.zeros((8, 4096), np.uint8)], layout_tag=TAG)
    client = TransferClient()
    try:
        result = await client.pull(ep.address, "good", TOKEN, [0, 1], local, [5, 6], timeout_s=5)
        assert result.num_blocks == 2 and local.block_bytes(5) == b"\x01" * 4096
    finally:
        client.close()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


async def test_an_oversize_message_drops_its_sender_and_others_are_served():
    ep = make_endpoint()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert ep.max_request_nbytes < 1 << 20
        sock.connect(ep.address)
        sock.send(b"x" * (16 << 20))
        assert monitor.poll(5000), "the endpoint kept the connection of a peer that sent 16 MiB"
        assert ep.stats()["num_transfers_refused"] == 0  # never parsed: zmq dropped it
        await pull_works(ep)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
        ep.stop()


async def test_a_peer_that_never_reads_gets_no_more_than_its_queue():
    ep = make_endpoint()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.rcvbuf = 4096  # little room on our side: what the endpoint cannot hand over waits on its side
    num_requests = 50_000
    try:
        sock.connect(ep.address)
        for i in range(num_requests):
            sock.send(bad_pull(i))
        wait_for(lambda: ep.stats()["num_transfers_refused"] == num_requests, timeout_s=60)
        received = 0
        while sock.poll(500):
            sock.recv()
            received += 1
        # Unbounded, every refusal would still arrive; bounded, the endpoint dropped what its queue could not take
        # (its queue, zmq's pipes and the kernel's socket buffers hold the rest).
        assert received < num_requests // 2, (received, _SEND_QUEUE_MESSAGES)
        await pull_works(ep)
    finally:
        sock.close(linger=0)
        ctx.term()
        ep.stop()


async def test_refusal_logs_are_bounded_and_cut_short(caplog):
    ep = make_endpoint()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    huge_id = "T" * 200
    try:
        sock.connect(ep.address)
        with caplog.at_level(logging.WARNING, logger="pdserve.kv.endpoint"):
            for i in range(2000):
                sock.send(bad_pull(i, huge_id))
                if i % 100 == 0:  # read as we go: the peer is well-behaved, only wrong
                    while sock.poll(0):
                        sock.recv()
            wait_for(lambda: ep.stats()["num_transfers_refused"] == 2000)
        lines = [r.getMessage() for r in caplog.records if r.name == "pdserve.kv.endpoint"]
        assert 1 <= len(lines) <= 40, len(lines)
        assert all(len(line) < 1500 for line in lines) and huge_id not in "".join(lines)
    finally:
        sock.close(linger=0)
        ctx.term()
        ep.stop()
