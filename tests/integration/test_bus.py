"""The bus against a real nats-server: typed request/reply, deadlines, bad input, trace context, reconnect."""

import asyncio
import time

import pytest

from pdserve import nats_server, tracecontext
from pdserve.bus import Bus, BusTimeout, NoResponders, RemoteError
from pdserve.protocol import CancelRequest, ErrorReply, StatsRequest, WorkerStats


async def connect(url: str, name: str) -> Bus:
    return await Bus.connect(url, name, connect_timeout_s=5)


async def until_served(raw, subject: str, timeout_s: float = 5.0) -> None:
    """Wait until `subject` has a responder as seen from the raw client's own connection.

    Once seen (on a loaded 2-core CI run) a first request from a second connection right after the serving
    connection's SUB + PING/PONG got "no responders"; what this test is about starts after that.
    """
    import nats.errors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await raw.request(subject, b"{}", timeout=1)
            return
        except nats.errors.NoRespondersError:
            assert time.monotonic() < deadline, f"no responder on {subject} within {timeout_s}s"
            await asyncio.sleep(0.05)


async def test_request_reply_is_typed(nats):
    server, client = await connect(nats.url, "server"), await connect(nats.url, "client")
    try:
        async def on_stats(_: StatsRequest) -> WorkerStats:
            return WorkerStats(worker_id="w1", role="decode", num_requests_served=7)

        await server.serve("t.stats", StatsRequest, on_stats)
        reply = await client.request("t.stats", StatsRequest(), WorkerStats, timeout_s=2)
        assert (reply.worker_id, reply.num_requests_served) == ("w1", 7)
    finally:
        await client.close(); await server.close()


async def test_deadline_fires_and_missing_service_is_named(nats):
    server, client = await connect(nats.url, "server"), await connect(nats.url, "client")
    try:
        async def slow(_: StatsRequest) -> WorkerStats:
            await asyncio.sleep(5)
            raise AssertionError("unreachable")

        await server.serve("t.slow", StatsRequest, slow)
        start = time.monotonic()
        with pytest.raises(BusTimeout):
            await client.request("t.slow", StatsRequest(), WorkerStats, timeout_s=0.3)
        assert time.monotonic() - start < 1.5
        with pytest.raises(NoResponders):
            await client.request("t.nobody", StatsRequest(), WorkerStats, timeout_s=2)
    finally:
        await client.close(); await server.close()


async def test_handler_errors_come_back_as_error_replies(nats):
    server, client = await connect(nats.url, "server"), await connect(nats.url, "client")
    try:
        async def broken(_: StatsRequest) -> WorkerStats:
            raise ValueError("disk on fire")

        async def refusing(_: StatsRequest) -> ErrorReply:
            return ErrorReply(code="overloaded", message="busy", retryable=True)

        await server.serve("t.broken", StatsRequest, broken)
        await server.serve("t.refuse", StatsRequest, refusing)
        with pytest.raises(RemoteError, match="disk on fire"):
            await client.request("t.broken", StatsRequest(), WorkerStats, timeout_s=2)
        with pytest.raises(RemoteError) as e:
            await client.request("t.refuse", StatsRequest(), WorkerStats, timeout_s=2)
        assert e.value.reply.code == "overloaded" and e.value.reply.retryable
    finally:
        await client.close(); await server.close()


async def test_malformed_messages_are_dropped_and_the_service_goes_on(nats):
    import nats as nats_py

    server = await connect(nats.url, "server")
    raw = await nats_py.connect(nats.url)
    received: list[CancelRequest] = []

    async def on_cancel(msg: CancelRequest) -> None:
        received.append(msg)

    async def on_stats(_: StatsRequest) -> WorkerStats:
        return WorkerStats(worker_id="w", role="prefill")

    try:
        await server.subscribe("t.cancel", CancelRequest, on_cancel)
        await server.serve("t.stats", StatsRequest, on_stats)
        await until_served(raw, "t.stats")
        for junk in (b"", b"\xff\xfe", b"[]", b'{"type": "cancel"}', b'{"type":"cancel","schema_version":1,"request_id":5}',
                     b'{"type":"heartbeat","schema_version":1}', b"x" * 100_000):
            await raw.publish("t.cancel", junk)
            reply = await raw.request("t.stats", junk, timeout=2)
            assert b'"error"' in reply.data  # a malformed request gets an ErrorReply, not silence
        await raw.publish("t.cancel", b'{"type":"cancel","schema_version":1,"request_id":"ok"}')
        await raw.flush()
        await asyncio.sleep(0.2)
        assert [m.request_id for m in received] == ["ok"]
    finally:
        await raw.close(); await server.close()


async def test_traceparent_travels_in_headers(nats):
    server, client = await connect(nats.url, "server"), await connect(nats.url, "client")
    seen: list[str | None] = []
    try:
        async def on_stats(_: StatsRequest) -> WorkerStats:
            seen.append(tracecontext.current())
            return WorkerStats(worker_id="w", role="prefill")

        await server.serve("t.stats", StatsRequest, on_stats)
        traceparent = tracecontext.new_traceparent()
        with tracecontext.use(traceparent):
            await client.request("t.stats", StatsRequest(), WorkerStats, timeout_s=2)
        await client.request("t.stats", StatsRequest(), WorkerStats, timeout_s=2)
        assert seen == [traceparent, None]
    finally:
        await client.close(); await server.close()


async def test_services_reconnect_after_nats_restarts(tmp_path):
    first = nats_server.start(store_dir=str(tmp_path / "a"), die_with_parent=True)
    server, client = await connect(first.url, "server"), await connect(first.url, "client")

    async def on_stats(_: StatsRequest) -> WorkerStats:
        return WorkerStats(worker_id="w", role="prefill")

    reconnects: list[str] = []
    server.on_reconnect.append(lambda: reconnects.append("server"))
    client.on_reconnect.append(lambda: reconnects.append("client"))
    try:
        await server.serve("t.stats", StatsRequest, on_stats)
        assert server.num_reconnects == client.num_reconnects == 0
        first.stop()
        await asyncio.sleep(0.5)
        second = nats_server.start(port=first.port, store_dir=str(tmp_path / "b"), die_with_parent=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    reply = await client.request("t.stats", StatsRequest(), WorkerStats, timeout_s=0.5)
                    break
                except (BusTimeout, NoResponders):
                    assert time.monotonic() < deadline, "no reconnect within 10 s"
                    await asyncio.sleep(0.2)
            assert reply.worker_id == "w"
            # Each says it reconnected, once (a router resets its silence clocks and its streams' deadlines then).
            deadline = time.monotonic() + 5
            while len(reconnects) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sorted(reconnects) == ["client", "server"]
            assert server.num_reconnects == client.num_reconnects == 1
        finally:
            await client.close(); await server.close()
            second.stop()
    finally:
        first.stop()


async def test_connect_names_the_fix_when_nats_is_absent(free_port):
    with pytest.raises(Exception, match="start nats-server or pass the right --nats URL"):
        await Bus.connect(f"nats://127.0.0.1:{free_port}", "lonely", connect_timeout_s=1)


async def test_a_service_is_reachable_from_another_connection_as_soon_as_serve_returns(nats):
    # Regression: nats-py's flush PING used to overtake the SUB, so a request from a second connection sent right
    # after serve() returned got "no responders" about once in 250 tries. 1000 tries catch that ~98% of the time.
    server, client = await connect(nats.url, "server"), await connect(nats.url, "client")
    try:
        async def on_stats(_: StatsRequest) -> WorkerStats:
            return WorkerStats(worker_id="w1", role="decode")

        for i in range(3000):
            sub = await server.serve(f"t.race.{i}", StatsRequest, on_stats)
            await client.request(f"t.race.{i}", StatsRequest(), WorkerStats, timeout_s=2)
            await server.unsubscribe(sub)
    finally:
        await client.close(); await server.close()
