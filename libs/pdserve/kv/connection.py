"""The decode side's connection to one TransferEndpoint: its ZeroMQ control socket, the drop monitor, and the
byte stream of tcp pulls once set up. The client (client.py) keeps them warm per endpoint; one pull's receive
(receiver.py) reads from one."""

from __future__ import annotations

import contextlib
import socket

import zmq


class Connection:
    """A DEALER socket to one endpoint and a monitor that reports when the endpoint drops the TCP connection
    (its process died or stopped): a pull waiting on it fails at once instead of at its deadline."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.stream: socket.socket | None = None  # tcp pulls' bytes (stream.py), once set up
        self.stream_ticket: str | None = None
        self.bounce: memoryview | None = None  # the stream's receive buffer (stream.BOUNCE_NBYTES)
        self.asked_for_stream = False  # a connection tries once; pulls on it use frames if that failed

    def was_dropped(self) -> bool:
        """Whether the endpoint dropped the connection since the last look."""
        try:
            self.monitor.recv_multipart(zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
