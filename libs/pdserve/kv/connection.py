"""The decode side's connection to one TransferEndpoint: its ZeroMQ control socket, the drop monitor, and the
byte stream of tcp pulls once set up. The client (client.py) keeps them warm per endpoint; one pull's receive
(receiver.py) reads from one."""

from __future__ import annotations

import contextlib
import socket
import time

import zmq
from zmq.utils.monitor import parse_monitor_message


class Connection:
    """A DEALER socket to one endpoint and a monitor that reports when the TCP connection is made, and when the
    endpoint drops it (its process died or stopped): a pull waiting on it fails at once instead of at its
    deadline. A connection never made within connect_timeout_s of its start fails its pull as PeerUnreachable
    (receiver.py): ZeroMQ itself would retry in silence until the pull's whole deadline."""

    def __init__(self, ctx: zmq.Context, address: str, connect_timeout_s: float = float("inf")):
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.connected = False  # the TCP connection was made (once is enough: a later drop is was_dropped's)
        self.connect_deadline = time.monotonic() + connect_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.stream: socket.socket | None = None  # tcp pulls' bytes (stream.py), once set up
        self.stream_ticket: str | None = None
        self.bounce: memoryview | None = None  # the stream's receive buffer (stream.BOUNCE_NBYTES)
        self.asked_for_stream = False  # a connection tries once; pulls on it use frames if that failed

    def was_dropped(self) -> bool:
        """Whether the endpoint dropped the connection since the last look (and note when it was made)."""
        dropped = False
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return dropped
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            else:
                dropped = True

    def never_connected_in_time(self) -> bool:
        """The TCP connection was still not made at its connect deadline (call after was_dropped())."""
        return not self.connected and time.monotonic() >= self.connect_deadline

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
