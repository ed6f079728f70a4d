"""PeerPaths: a marked prefill worker is announced at once, stays marked while probes fail, and is cleared by
the first probe that connects (real sockets on loopback)."""

from __future__ import annotations

import asyncio
import socket

from pdserve.peer_paths import PeerPaths


async def test_a_mark_is_announced_at_once_and_cleared_by_the_first_probe_that_connects():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens yet: probes are refused
    announced = []

    async def on_change() -> None:
        announced.append(paths.unreachable_ids)

    paths = PeerPaths("decode-1", probe_interval_s=0.1, connect_timeout_s=0.5, on_change=on_change)
    try:
        paths.mark("prefill-1", f"tcp://127.0.0.1:{port}", "no connection within 2s")
        paths.mark("prefill-1", f"tcp://127.0.0.1:{port}", "again")  # once is enough
        assert paths.unreachable_ids == ("prefill-1",) and paths.why_unreachable("prefill-1") == "no connection within 2s"
        await asyncio.sleep(0.35)  # a few refused probes: still marked, announced once
        assert announced == [("prefill-1",)] and paths.why_unreachable("prefill-2") is None
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        try:
            for _ in range(50):
                if not paths.unreachable_ids:
                    break
                await asyncio.sleep(0.05)
            assert paths.unreachable_ids == () and announced[-1] == ()
        finally:
            server.close()
    finally:
        await paths.stop()
