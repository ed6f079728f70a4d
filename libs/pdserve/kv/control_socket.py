"""The transfer endpoint's control socket: the ZeroMQ ROUTER that pulls connect to (wire.py has the protocol), set
up with the bounds on what a peer may queue or send, read in bursts, and answered with header-only messages that
are dropped when the peer cannot take them. The counterpart of the client's Connection (connection.py).

Kept apart from endpoint.py, which decides what a message means and whom to serve: this module knows frames and
socket options, not pulls; it is used only by the endpoint's serving thread, once start() has bound it.
"""

from __future__ import annotations

import logging
from typing import Iterator

import orjson
import zmq

from pdserve.kv import wire
from pdserve.throttled_log import ThrottledLog, clip

logger = logging.getLogger(__name__)

_RECEIVE_BURST = 256  # messages read per wake-up, so that sending is never starved by a flood of requests


class ControlSocket:
    """A ROUTER socket for bind_host, not yet bound. max_request_nbytes: zmq drops the connection of a peer that
    sends more at once. `complaints`: the endpoint's log of what peers do wrong (one budget for all of it)."""

    def __init__(self, ctx: zmq.Context, bind_host: str, max_request_nbytes: int,
                 complaints: ThrottledLog) -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1  # a vanished client raises EHOSTUNREACH instead of silently eating batches
        # Credit bounds the data queued per pull (and a peer's pulls are bounded), so a well-behaved peer never
        # reaches this; one that sends requests and never reads finds its queue full and gets nothing more.
        sock.sndhwm = wire.SEND_QUEUE_MESSAGES
        sock.maxmsgsize = max_request_nbytes
        if ":" in bind_host:
            sock.ipv6 = True
        self.sock = sock
        self.bind_host = bind_host
        self._complaints = complaints

    def bind(self) -> int:
        """Listen on a port the kernel picks; the port. zmq.ZMQError if it cannot."""
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        self.sock.bind(f"tcp://{host}:0")
        return int(self.sock.last_endpoint.decode().rsplit(":", 1)[1])

    def receive(self) -> Iterator[tuple[bytes, bytes]]:
        """The messages waiting, up to a burst, as (identity, raw header); others are complained of and skipped."""
        for _ in range(_RECEIVE_BURST):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._complaints.warning("kv transfer endpoint: dropped a message of %d frames", len(frames))
                continue
            yield frames[0], frames[1]

    def send(self, message: list) -> None:
        """A pull's message, [identity, header, *frames], without copying its frames; zmq.ZMQError if the peer is
        gone or its queue is full."""
        self.sock.send_multipart(message, zmq.NOBLOCK, copy=False)

    def send_error(self, identity: bytes, nonce: str | None, reason: str, message: str) -> None:
        self.send_control(identity, {"k": "error", "nonce": nonce, "reason": reason, "message": clip(message, 1000)})

    def send_control(self, identity: bytes, header: dict) -> None:
        """A header-only answer (refusal, confirmation), dropped if the peer cannot take it."""
        try:
            self.sock.send_multipart([identity, orjson.dumps(header)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the peer left, or does not read what it asked for: nobody takes this answer
            logger.debug("could not deliver %s: %s", header["k"], e)

    def close(self) -> None:
        self.sock.close(linger=0)
