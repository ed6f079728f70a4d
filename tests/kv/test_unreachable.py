"""A pull whose connection can never be made fails as PeerUnreachable at the connect deadline, not the pull's; a
refusal from an endpoint that answered is not "unreachable" (the path works)."""

from __future__ import annotations

import socket
import time

import pytest

from pdserve.kv import ArrayBlockPool, PeerUnreachable, TransferClient, TransferEndpoint, TransferError


def refused_address() -> str:
    """A loopback port nothing listens on (connections are refused; ZeroMQ retries them in silence)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


async def test_a_pull_that_cannot_connect_fails_at_the_connect_deadline_as_unreachable():
    client = TransferClient(connect_timeout_s=0.3)
    pool = ArrayBlockPool.zeros(4, 1024)
    try:
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match=r"--kv-connect-timeout-s.*--advertise-host"):
            await client.pull(refused_address(), "t1", "token", [0], pool, [1], timeout_s=10)
        assert time.monotonic() - started < 2.0  # the connect deadline (0.3 s), not the pull's 10 s
    finally:
        client.close()


async def test_a_refusal_from_a_reachable_endpoint_is_not_taken_for_an_unreachable_path():
    pool = ArrayBlockPool.zeros(4, 1024)
    endpoint = TransferEndpoint(pool, bind_host="127.0.0.1")
    endpoint.start()
    client = TransferClient(connect_timeout_s=0.3)
    try:
        address = endpoint.address
        with pytest.raises(TransferError) as failure:  # unknown transfer: refused by a reachable endpoint
            await client.pull(address, "nope", "token", [0], pool, [1], timeout_s=5)
        assert not isinstance(failure.value, PeerUnreachable)
    finally:
        client.close()
        endpoint.stop()
