"""A slow link where the kernel has no netem: a TCP proxy that forwards every byte a fixed time later.

    python delay_proxy.py --delay-ms 50 0.0.0.0:4222=198.18.16.11:4222 [LISTEN=TARGET ...]

Each accepted connection gets its own connection to the target; what one side sends reaches the other
delay-ms after the proxy read it, in each direction, in order, without holding back what follows (a link with
latency, not a slow one: throughput is not capped). A half-close travels with the same delay; a reset closes
both sides at once. The connect itself is not delayed. Prints "ready" once every listener is bound; standalone
(no pdserve import), so that it starts fast in a host's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys

CHUNK = 256 * 1024
MAX_QUEUED_CHUNKS = 256  # per direction: past this, reading pauses (back-pressure instead of memory)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """One direction: read as it comes, write each chunk delay_s after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(MAX_QUEUED_CHUNKS)

    async def read() -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((loop.time() + delay_s, data))
                if not data:
                    return
        except OSError:
            await queue.put((loop.time(), None))  # a reset: the writer learns it at once


    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if data is None:
                raise ConnectionResetError("the other side reset the connection")
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await reading


async def serve_connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                           target: tuple[str, int], delay_s: float) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError as e:
        print(f"connect to {target[0]}:{target[1]} failed: {e}", flush=True)
        client_writer.close()
        return
    for w in (client_writer, server_writer):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    directions = [asyncio.ensure_future(pipe(client_reader, server_writer, delay_s)),
                  asyncio.ensure_future(pipe(server_reader, client_writer, delay_s))]
    try:
        # Both half-closed in turn: done. One failed (a reset): the other side is closed at once too.
        done, pending = await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
    finally:
        for w in (client_writer, server_writer):
            w.close()
        for task in directions:
            with contextlib.suppress(BaseException):
                await task


def parse_route(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, _, target = text.partition("=")
    lhost, _, lport = listen.rpartition(":")
    thost, _, tport = target.rpartition(":")
    if not (lhost and lport.isdigit() and thost and tport.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LISTEN_HOST:PORT=TARGET_HOST:PORT")
    return (lhost, int(lport)), (thost, int(tport))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="added to each direction")
    parser.add_argument("routes", nargs="+", type=parse_route, metavar="LISTEN_HOST:PORT=TARGET_HOST:PORT")
    args = parser.parse_args()
    delay_s = args.delay_ms / 1000
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    servers = []
    for listen, target in args.routes:
        servers.append(await asyncio.start_server(
            lambda r, w, target=target: serve_connection(r, w, target, delay_s), *listen, reuse_address=True))
        print(f"forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} with {args.delay_ms:g} ms each way",
              flush=True)
    print("ready", flush=True)
    await stopping.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
