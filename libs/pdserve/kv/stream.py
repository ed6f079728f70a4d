"""The TCP path's byte stream: a plain TCP connection beside the ZeroMQ control socket, so that KV bytes go
from the prefill pool into the kernel, and from the kernel through a small cache-resident buffer into the decode
pool (BOUNCE_NBYTES says why not straight in).

Why: over ZeroMQ frames the decode side copied every byte through zmq's message buffers in zmq's I/O thread, then
into place in Python, and the prefill side paid zmq's garbage-collector thread once per zero-copy frame. Profiled on this project's 2-core machine (benchmarks/README.md, 64 MiB pulls, SmolLM2
layout), that was ~1.9x a raw socket's CPU per GB on the decode side and ~1.7x on the prefill side; throughput
on a machine whose cores are busy follows CPU per GB.

How a connection gets its stream: the client's first message on a new control connection is {"op": "hello"};
the endpoint answers {"k": "hello", port, ticket}: the port of its stream listener (bound like the control socket,
port 0, same host) and a one-time ticket bound to that control connection. The client connects, sends the ticket
and waits for one byte of acknowledgement, so the stream is attached before any pull names it. A pull then says
"stream": ticket and its bytes go on the stream, batch by batch (pool.BatchStream order), each batch framed as
    <first position u32><block count u32> <the batch's bytes> <one xxh3_64 per segment index, u64 each>
all little-endian. Control (refusals, the releases that stop a pull) stays on ZeroMQ; an endpoint that stops a
pull mid-stream closes the stream, since its byte position is then undefined. TCP's own flow control replaces
the frames' credit. A client that cannot reach the stream port (a firewall that lets only the control port
through) pulls over ZeroMQ frames instead, with one WARNING per endpoint, counted like other fallbacks.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

from pdserve import netaddr

logger = logging.getLogger(__name__)

TICKET_NBYTES = 16
ACK = b"\x01"
BATCH_HEAD = struct.Struct("<II")  # first position in the pull, number of blocks
CHUNK_NBYTES = 1 << 20  # walked, checksummed and sent (or received) at a time: stays in cache between the two
# The decode side receives through a buffer this small and copies it into place: received straight into a large
# destination the kernel's copy cost ~2x per byte (measured, 2-core VM: 340 vs 180 core-ms per GB; the bounce
# buffer stays in L1/L2, so the copy out of it and the checksum read cache).
BOUNCE_NBYTES = 64 << 10
HELLO_TIMEOUT_S = 5.0  # a connection on the stream port must present its ticket within this
_MAX_IOV = 1024  # the kernel's limit of buffers per sendmsg
MAX_TICKETS = 4096  # tickets issued and not yet presented, in all (a peer that only says hello cannot grow this)


STREAM_MAX_CORES = 4  # a client with at most this many cores to run on takes the stream (see the module's doc)


def prefers_stream() -> bool:
    """Whether this process should take the stream by default: it may run on few cores (its CPU affinity, which
    pinning, e.g. of a vLLM worker to a core, narrows)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores <= STREAM_MAX_CORES


def set_stream_options(sock: socket.socket) -> None:
    # Heads and trailers are a few bytes between large sends: Nagle would hold them back for an ack.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class Stream:
    """One attached stream (endpoint side): the control connection it belongs to, and what is queued on it."""

    sock: socket.socket
    identity: bytes  # the ZeroMQ identity of the control connection that was given its ticket
    ticket: bytes
    pull: object | None = None  # the pull using it (the endpoint's), until its last bytes are in the kernel
    outbox: collections.deque = field(default_factory=collections.deque)  # memoryviews / bytes not yet sent

    def send_or_queue(self, data) -> None:
        """Send data now if nothing is queued ahead of it and the socket takes it; queue what it does not take.
        OSError when the peer is gone."""
        sent = 0
        if not self.outbox:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                pass
        if sent < memoryview(data).nbytes:
            self.outbox.append(memoryview(data)[sent:])

    def send_queued(self, max_nbytes: int) -> int:
        """Send from the outbox without blocking, up to about max_nbytes; the bytes sent. OSError when the peer
        is gone."""
        sent_total = 0
        while self.outbox and sent_total < max_nbytes:
            # One gather write of everything queued: the kernel packs heads, bytes and trailers into full segments
            # (a separate small send would go out as a small packet of its own under TCP_NODELAY).
            try:
                sent = self.sock.sendmsg(list(itertools.islice(self.outbox, _MAX_IOV)))
            except BlockingIOError:
                break
            sent_total += sent
            while sent:
                head = self.outbox[0]
                n = memoryview(head).nbytes
                if sent >= n:
                    self.outbox.popleft()
                    sent -= n
                else:
                    self.outbox[0] = memoryview(head)[sent:]
                    return sent_total  # the socket's buffer is full: wait for POLLOUT
        return sent_total


class StreamServer:
    """The endpoint's side: a listening socket, the tickets it gave out, connections that have not yet presented
    one, and the attached streams. Used only by the endpoint's serving thread."""

    def __init__(self, bind_host: str) -> None:
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((bind_host, 0))
            self.listener.listen(128)
        except OSError as e:
            self.listener.close()
            raise netaddr.BindError(e.errno, f"the KV byte stream cannot listen on {bind_host} ({e.strerror or e}); "
                                    "pass --bind-host with an address of this host (0.0.0.0: all of them)") from e
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self._tickets: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # ticket -> identity
        self.pending: dict[int, tuple[socket.socket, float, bytearray]] = {}  # fd -> (sock, accepted at, so far)
        self.streams: dict[bytes, Stream] = {}  # ticket -> stream
        self.by_fd: dict[int, Stream] = {}

    def issue_ticket(self, identity: bytes) -> bytes:
        ticket = secrets.token_bytes(TICKET_NBYTES)
        self._tickets[ticket] = identity
        while len(self._tickets) > MAX_TICKETS:
            self._tickets.popitem(last=False)
        return ticket

    def accept(self) -> list[socket.socket]:
        """Connections waiting on the listener, accepted (non-blocking); they must present a ticket next."""
        accepted = []
        while len(self.pending) < MAX_TICKETS:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. EMFILE: leave the rest in the backlog, try again at the next wake-up
                logger.warning("kv stream listener: accept failed (%s)", e)
                break
            sock.setblocking(False)
            set_stream_options(sock)
            self.pending[sock.fileno()] = (sock, time.monotonic(), bytearray())
            accepted.append(sock)
        return accepted

    def read_ticket(self, fd: int) -> Stream | None:
        """A pending connection is readable: the stream it attaches once its whole ticket is here, else None (and
        it is closed if the ticket is wrong or it hung up)."""
        sock, accepted_at, got = self.pending[fd]
        try:
            data = sock.recv(TICKET_NBYTES - len(got))
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        got += data
        if data and len(got) < TICKET_NBYTES:
            return None
        del self.pending[fd]
        identity = self._tickets.pop(bytes(got), None) if len(got) == TICKET_NBYTES else None
        if identity is None:
            logger.debug("kv stream listener: closed a connection without a valid ticket")
            sock.close()
            return None
        try:
            sock.send(ACK)
        except OSError:
            sock.close()
            return None
        stream = Stream(sock, identity, bytes(got))
        self.streams[stream.ticket] = stream
        self.by_fd[fd] = stream
        return stream

    def expire_pending(self, now: float) -> list[int]:
        """Connections that did not present a ticket in time, closed; their fds."""
        late = [fd for fd, (_, at, _) in self.pending.items() if now - at > HELLO_TIMEOUT_S]
        for fd in late:
            self.pending.pop(fd)[0].close()
        return late

    def attach(self, ticket: bytes, identity: bytes) -> Stream | None:
        """The stream a pull names, if it is this control connection's and free."""
        stream = self.streams.get(ticket)
        if stream is None or stream.identity != identity or stream.pull is not None:
            return None
        return stream

    def drop(self, stream: Stream) -> int:
        """Forget and close a stream (its peer hung up, or its byte position is undefined); its fd."""
        fd = stream.sock.fileno()
        self.by_fd.pop(fd, None)
        self.streams.pop(stream.ticket, None)
        stream.outbox.clear()
        stream.sock.close()
        return fd

    def close(self) -> None:
        for stream in list(self.streams.values()):
            self.drop(stream)
        for sock, _, _ in self.pending.values():
            sock.close()
        self.pending.clear()
        self.listener.close()


def connect(host: str, port: int, ticket: bytes, timeout_s: float, wait_s: float) -> socket.socket:
    """Client side: open a stream to an endpoint and present the ticket; the socket once acknowledged. It is left
    blocking with a kernel receive timeout of wait_s (SO_RCVTIMEO: a recv that waits longer fails with EAGAIN), so
    that the reader sleeps in recv itself, as a plain socket reader does: polling before each recv instead cost
    about twice the kernel time per byte (measured, 2-core VM). OSError (refused, unreachable, timed out,
    closed) when the stream cannot be set up."""
    sock = socket.create_connection((host, port), timeout=max(timeout_s, 0.001))
    try:
        set_stream_options(sock)
        sock.sendall(ticket)
        if sock.recv(1) != ACK:
            raise ConnectionError(errno.ECONNRESET, "the endpoint closed the stream instead of acknowledging it")
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(wait_s), int((wait_s - int(wait_s)) * 1e6)))
        return sock
    except BaseException:
        sock.close()
        raise
