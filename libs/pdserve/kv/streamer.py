"""The transfer endpoint's byte streams (stream.py) as its serving thread drives them: the stream listener and the
sockets the serving loop polls for it (accepting connections, reading their tickets, waiting for room to send),
the tickets a pull names, and a stream pull's turns of chunks until its last bytes are in the kernel.

Kept apart from endpoint.py, which decides whom to serve and when (requests, leases, credit, refusals, the pulls in
flight): a Streamer moves the bytes of the pulls it is handed onto their streams and says how a pull or a stream
ended (StreamEnd); it never refuses, counts a pull served or drops a pull itself, so those stay in one place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import zmq

from pdserve.kv import stream
from pdserve.kv.cutter import Cutter, ServedPull

_CHUNKS_PER_TURN = 8  # stream.CHUNK_NBYTES each


@dataclass(frozen=True)
class StreamEnd:
    """How a stream pull or its stream ended: "served" (its last bytes are in the kernel), "released" (its lease was
    released before this turn cut anything), "failed" (cutting raised `error`) or "gone" (the client hung up or went
    away, `why`). Every end but "served" leaves the stream for the endpoint to drop, after it has told the client
    why on the control socket."""

    how: str
    stream: stream.Stream
    pull: ServedPull | None = None
    why: str = ""
    error: Exception | None = None


def _done(pull: ServedPull) -> bool:
    return pull.batch is None and pull.next_index == len(pull.block_ids)


class Streamer:
    """Used only by the endpoint's serving thread. `poller` is the serving loop's (the control socket polled there
    too); `cutting` is the endpoint's lock, held while a chunk is cut from pool memory (TransferEndpoint.release())."""

    def __init__(self, bind_host: str, poller: zmq.Poller, cutter: Cutter, cutting: threading.Lock) -> None:
        self.server = stream.StreamServer(bind_host)  # netaddr.BindError if it cannot listen
        self.port = self.server.port  # what hello answers (a test points it elsewhere, as a firewall would)
        self._poller = poller
        self._watched: dict[int, int] = {}  # raw socket fd -> poll flags registered
        self._cutter = cutter
        self._cutting = cutting
        self._watch(self.server.listener.fileno(), zmq.POLLIN)

    def hello(self, identity: bytes) -> dict:
        """The answer's fields for a control connection that asks where its byte stream may connect."""
        return {"port": self.port, "ticket": self.server.issue_ticket(identity).hex()}

    def attach(self, ticket: object, identity: bytes) -> stream.Stream | None:
        """The stream a pull names by its ticket (as sent), if it is this control connection's and free."""
        if not (isinstance(ticket, str) and len(ticket) == 2 * stream.TICKET_NBYTES):
            return None
        return self.server.attach(bytes.fromhex(ticket), identity)

    def on_events(self, events: dict) -> list[StreamEnd]:
        """The serving loop's poll events on raw sockets (fd -> flags): connections accepted, tickets read, queued
        bytes sent; the ends met."""
        server, ends = self.server, []
        for fd, flags in events.items():
            if fd == server.listener.fileno():
                for sock in server.accept():
                    self._watch(sock.fileno(), zmq.POLLIN)
            elif fd in server.pending:
                self._watch(fd, 0)
                attached = server.read_ticket(fd)
                if attached is not None or fd in server.pending:
                    self._watch(fd, zmq.POLLIN)
            elif (s := server.by_fd.get(fd)) is not None:
                if flags & (zmq.POLLIN | zmq.POLLERR):  # clients never write after the ticket: it hung up
                    ends.append(StreamEnd("gone", s, why="its client closed the stream"))
                elif flags & zmq.POLLOUT:
                    ends += self._send_queued(s)
        return ends

    def turn(self, pull: ServedPull) -> list[StreamEnd]:
        """A stream pull's turn: cut its next chunks, sending each as it is cut, while the socket takes them whole
        (up to a share per turn, so that pulls in flight take turns and the serving loop's poll is paid per
        share, not per chunk)."""
        s = pull.stream
        if s.outbox:
            return []  # waiting for POLLOUT
        try:
            with self._cutting:
                if pull.allowed.released:
                    return [StreamEnd("released", s, pull)]
                for _ in range(_CHUNKS_PER_TURN):
                    self._cutter.cut_chunk(pull)
                    if s.outbox or _done(pull):
                        break
        except OSError as e:
            return [StreamEnd("gone", s, why=f"its client went away: {e}")]
        except Exception as e:  # e.g. the pool failed
            return [StreamEnd("failed", s, pull, error=e)]
        return self._after_send(s)

    def drop(self, s: stream.Stream) -> None:
        """Stop polling a stream and close it (its byte position is undefined, or its client is gone)."""
        self._watch(s.sock.fileno(), 0)
        self.server.drop(s)

    def expire_pending(self, now: float) -> None:
        """Close the connections that did not present a ticket in time."""
        for fd in self.server.expire_pending(now):
            self._watch(fd, 0)

    def close(self) -> None:
        self.server.close()

    def _send_queued(self, s: stream.Stream) -> list[StreamEnd]:
        try:
            s.send_queued(4 * stream.CHUNK_NBYTES)
        except OSError as e:
            return [StreamEnd("gone", s, why=f"its client went away: {e}")]
        return self._after_send(s)

    def _after_send(self, s: stream.Stream) -> list[StreamEnd]:
        """The pull on a stream ends the moment its last bytes are in the kernel (before the client can have them
        all and name the stream in its next pull); else the stream is polled for room while bytes are queued."""
        pull, ends = s.pull, []
        if pull is not None and not s.outbox and _done(pull):
            s.pull = None
            ends.append(StreamEnd("served", s, pull))
        self._watch(s.sock.fileno(), zmq.POLLIN | zmq.POLLOUT if s.outbox else zmq.POLLIN)
        return ends

    def _watch(self, fd: int, flags: int) -> None:
        """Poll a raw socket for `flags` (0: not at all)."""
        if self._watched.get(fd, 0) == flags:
            return
        if flags:
            self._poller.register(fd, flags)
            self._watched[fd] = flags
        else:
            self._poller.unregister(fd)
            del self._watched[fd]
