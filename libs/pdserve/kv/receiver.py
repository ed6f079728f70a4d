"""One pull's receiving end, on the client's worker thread: the replies on its control connection (tcp frames,
shm descriptions, the cuda-ipc description and its confirmation) or its bytes on the stream (stream.py), each
batch checked against its checksums, all within the pull's deadline and its cancel event.

Kept apart from client.py, which decides where and how a pull goes (its connections, the path for each peer
and the fallbacks when one does not work): a Receiver knows only the one pull it was made for, and keeps its
connection, nonce, deadline and cancel event together so that the receive loops do not pass them on and on.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import math
import struct
import threading
import time
from concurrent.futures import Executor
from typing import Callable

import numpy as np
import orjson
import xxhash
import zmq

from pdserve.kv import shm, stream, wire
from pdserve.kv.errors import (REFUSAL_REASONS, LayoutMismatch, PathUnavailable, PeerUnreachable, TransferError,
                               TransferIntegrityError, TransferRefused, TransferTimeout)
from pdserve.kv.connection import Connection
from pdserve.kv.nixl_landing import Landing
from pdserve.kv.nixl_path import NixlAgent
from pdserve.kv.pool import BatchStream, BlockPool, batch_iov, batch_pieces, pieces_checksums
from pdserve.kv.read_fence import ReadFence


logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The pull's cancel event was set; args[0], where the receiver knew it, is how many blocks had arrived."""


class Receiver:
    """Receives one pull on one connection; `closing` is the client's, set by TransferClient.close()."""

    def __init__(self, conn: Connection, nonce: str, transfer_id: str, num_blocks: int, deadline: float,
                 timeout_s: float, cancel: threading.Event, closing: threading.Event) -> None:
        self.conn = conn
        self.nonce = nonce
        self.transfer_id = transfer_id
        self.num_blocks = num_blocks
        self.deadline = deadline  # monotonic
        self.timeout_s = timeout_s  # as asked, for the timeout's message
        self.cancel = cancel
        self.closing = closing
        self.landed_on_device = False  # the bytes went into the pool's device memory itself (cuda-ipc, nixl VRAM)

    def receive_replies(self, path: str, pool: BlockPool, local_ids: list[int], remote_ids: list[int], *,
                        window: int, checker: Executor, copy_device: Callable, nixl: NixlAgent | None = None,
                        landing_for: Callable[[object], Landing] | None = None, fence: ReadFence | None = None) -> None:
        """The pull's replies on the control connection: tcp frames, shm or nixl descriptions, or the cuda-ipc
        description, and the confirmation of a pull read where it lies. landing_for(device or None): the nixl
        landing buffers in that GPU's memory or in host memory. fence: nixl from host memory READs straight into
        the local blocks (the pull asked for it: "direct"), and READs still running when the pull fails go to it."""
        address, sock, num_blocks, transfer_id = self.conn.address, self.conn.sock, self.num_blocks, self.transfer_id
        checks: list = []  # shm: each batch's checksum check, running while the next batch is copied
        reads = _NixlReads(self, nixl, landing_for, pool, fence) if path == "nixl" else None
        received = 0
        try:
            batch: BatchStream | None = None
            owed, credit_every = 0, max(1, window // 4)  # fewer credit messages, fewer endpoint wake-ups
            while received < num_blocks:
                frames = self.receive(received)
                header = parse_header(frames[0], transfer_id, address)
                if header.get("nonce") != self.nonce:
                    logger.debug("transfer %s: ignored a reply for another pull", transfer_id)
                    continue
                if header.get("k") == "error":
                    raise _error_from(header, transfer_id, address)
                first, count, checksums = header.get("i"), header.get("c"), header.get("h")
                try:
                    kind = {"shm": "shm", "nixl": "nixl", "cuda-ipc": "cuda"}.get(path, "data")
                    if header.get("k") != kind or first != received or not isinstance(
                            count, int) or not (0 < count <= num_blocks - received):
                        raise ValueError(f"unexpected header {str(header)[:200]}")
                    if path == "cuda-ipc":
                        copy_device(header, pool, local_ids, remote_ids)
                        self._confirm_held()
                        self.landed_on_device = True
                        received = num_blocks
                    elif path == "shm":
                        ids = local_ids[first:first + count]
                        _read_described(header, pool, ids)
                        checks.append(checker.submit(_check_described, header, pool, ids, transfer_id, address))
                        received += count
                    elif path == "nixl":
                        reads.post(header, local_ids[first:first + count])
                        received += count
                    elif batch is None:
                        ids = local_ids[first:first + count]
                        # A staging pool (GPU KV) moves each segment on to the device as soon as it is here.
                        after = functools.partial(commit, ids) if (commit := getattr(pool, "commit_segment", None)) else None
                        batch = BatchStream(pool, ids, after_segment=after)
                    for frame in frames[1:] if path == "tcp" else ():
                        src, offset = frame.buffer, 0
                        for dst in batch.walk(src.nbytes):
                            dst[:] = src if dst.nbytes == src.nbytes else src[offset:offset + dst.nbytes]
                            offset += dst.nbytes
                    if checksums is not None and path == "tcp":
                        if batch.nbytes_left or not isinstance(checksums, list) or len(checksums) != len(
                                pool.segment_nbytes):
                            raise ValueError(f"batch of blocks {first}.. ended early or with a bad checksum list")
                        _check(batch.checksums(), checksums, transfer_id, first, count, local_ids[first], address)
                        batch, received = None, received + count
                except ValueError as e:
                    raise TransferError(f"transfer {transfer_id}: malformed reply from {address} ({e}); both sides "
                                        "must run the same pdserve version") from e
                owed += 1
                if received < num_blocks and owed >= credit_every:
                    sock.send(orjson.dumps({"op": "credit", "nonce": self.nonce, "n": owed}), zmq.NOBLOCK)
                    owed = 0
            if reads is not None:
                reads.finish()
                if reads.confirms:
                    self._confirm_held()
                    self.landed_on_device = reads.on_device
        except Cancelled:
            raise Cancelled(received) from None
        finally:
            if reads is not None:
                reads.abandon()  # after a failure: nothing may write into the local blocks once the pull ends
        for check in checks:  # every batch's checksums, before the pull counts as done
            check.result()

    def receive_stream(self, pool: BlockPool, local_ids: list[int]) -> None:
        """tcp over the stream: each batch's head, its bytes (through the connection's small buffer into the local
        blocks), its checksums."""
        conn, transfer_id = self.conn, self.transfer_id
        num_blocks, nseg = self.num_blocks, len(pool.segment_nbytes)
        head, trailer = bytearray(stream.BATCH_HEAD.size), bytearray(8 * nseg)
        commit = getattr(pool, "commit_segment", None)
        fill = self._fill
        received = 0
        try:
            while received < num_blocks:
                fill(memoryview(head), received)
                first, count = stream.BATCH_HEAD.unpack(head)
                if first != received or not 0 < count <= num_blocks - received:
                    raise TransferError(f"transfer {transfer_id}: malformed stream from {conn.address} (batch {first}+"
                                        f"{count} after {received} of {num_blocks}); both sides must run the same "
                                        "pdserve version")
                ids = local_ids[first:first + count]
                batch = BatchStream(pool, ids, after_segment=functools.partial(commit, ids) if commit else None)
                while batch.nbytes_left:
                    for view in batch.walk(min(stream.CHUNK_NBYTES, batch.nbytes_left)):
                        fill(view, received)
                fill(memoryview(trailer), received)
                _check(batch.checksums(), list(struct.unpack(f"<{nseg}Q", trailer)), transfer_id, first, count,
                       local_ids[first], conn.address)
                received += count
        except Cancelled:
            raise Cancelled(received) from None

    def _fill(self, view: memoryview, received: int) -> None:
        """Receive exactly len(view) bytes of the stream into view, within the pull's deadline; a refusal on the
        control socket, cancellation, close() or the endpoint hanging up end it with the matching error."""
        conn, transfer_id = self.conn, self.transfer_id
        got, total = 0, view.nbytes
        bounce = conn.bounce
        while got < total:
            try:
                n = conn.stream.recv_into(bounce[:total - got] if total - got < bounce.nbytes else bounce)
                if n == 0:
                    raise ConnectionResetError("end of stream")
                view[got:got + n] = bounce[:n]
                got += n
                continue
            except BlockingIOError:  # SO_RCVTIMEO passed with nothing: look around, then wait again
                pass
            except OSError as e:  # the endpoint closed the stream: a refusal says why, else it is gone
                self._raise_control_error(wait_s=0.2)
                raise _closed(transfer_id, conn.address, received, self.num_blocks, f"{e}; ") from e
            self._time_left(received)
            self._raise_control_error(wait_s=0)

    def _raise_control_error(self, wait_s: float) -> None:
        """A stream pull's refusal, if the endpoint sent one on the control socket (waiting up to wait_s for it)."""
        conn, transfer_id = self.conn, self.transfer_id
        until = time.monotonic() + wait_s
        while True:
            try:
                frames = conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                left = until - time.monotonic()
                if left <= 0 or not conn.sock.poll(max(1, math.ceil(left * 1000))):
                    return
                continue
            header = parse_header(frames[0], transfer_id, conn.address)
            if header.get("nonce") == self.nonce and header.get("k") == "error":
                raise _error_from(header, transfer_id, conn.address)

    def _confirm_held(self) -> None:
        """A pull read where it lies (cuda-ipc, nixl), every byte landed: TransferIntegrityError unless the endpoint
        still held the transfer then (no checksums there: only a release could have let the blocks change under
        the copy)."""
        if not self._confirm():
            raise TransferIntegrityError(
                f"transfer {self.transfer_id}: the prefill side released it while its blocks were being copied from "
                f"{self.conn.address} (they may have been reused under the copy); recompute the prefill")

    def _confirm(self) -> bool:
        """Whether the endpoint still held the transfer once the copy was done."""
        conn, nonce, transfer_id = self.conn, self.nonce, self.transfer_id
        conn.sock.send(orjson.dumps({"op": "done", "nonce": nonce}), zmq.NOBLOCK)
        while True:
            frames = self.receive(self.num_blocks)  # every block landed: a timeout here is the confirmation's
            header = parse_header(frames[0], transfer_id, conn.address)
            if header.get("nonce") != nonce:
                continue
            if header.get("k") == "error":
                raise _error_from(header, transfer_id, conn.address)
            return header.get("k") == "done" and header.get("ok") is True

    def receive(self, received: int) -> list:
        """The next message on the control connection, within the pull's deadline."""
        conn, address = self.conn, self.conn.address
        while True:
            left = self._time_left(received)
            # Data first, without a poll when it is already there (the common case while a pull streams);
            # the monitor is looked at only between waits, so a dropped connection fails the pull within
            # one wire.CLIENT_POLL_S, and what arrived before the drop is still read.
            with contextlib.suppress(zmq.Again):
                return conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            dropped = conn.was_dropped()
            if dropped and conn.connected:
                raise _closed(self.transfer_id, address, received, self.num_blocks)
            if dropped or conn.never_connected_in_time():  # dropped before it was ever made: no route
                raise PeerUnreachable(
                    f"transfer {self.transfer_id}: no connection to {address} "
                    f"{'could be made' if dropped else f'within {conn.connect_timeout_s:g}s (--kv-connect-timeout-s)'}: "
                    "the prefill worker's advertised address is not reachable from this host; check its "
                    "--advertise-host, the route between the hosts, and firewalls on its port")
            conn.sock.poll(max(1, math.ceil(min(left, wire.CLIENT_POLL_S) * 1000)))

    def _time_left(self, received: int) -> float:
        """Seconds left to the pull's deadline; raises when it passed, or on cancellation or close()."""
        transfer_id, address, cancel, closing = self.transfer_id, self.conn.address, self.cancel, self.closing
        if cancel.is_set() or closing.is_set():
            if closing.is_set() and not cancel.is_set():
                raise TransferError(f"transfer {transfer_id}: TransferClient closed during the pull")
            raise Cancelled()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(
                f"transfer {transfer_id}: got {received} of {self.num_blocks} blocks from {address} within "
                f"timeout_s={self.timeout_s}: the prefill endpoint is stalled, gone or unreachable; check the "
                "address is reachable from this host (prefill --advertise-host) or raise the timeout")
        return left


def parse_header(frame, transfer_id: str, address: str) -> dict:
    """A reply's JSON header (its first frame); TransferError if it is none."""
    try:
        header = orjson.loads(frame.buffer)
    except orjson.JSONDecodeError as e:
        raise TransferError(f"transfer {transfer_id}: unreadable reply from {address}; is that a pdserve "
                            "transfer endpoint?") from e
    if not isinstance(header, dict):
        raise TransferError(f"transfer {transfer_id}: unreadable reply from {address}")
    return header


def _error_from(header: dict, transfer_id: str, address: str) -> TransferError:
    """An endpoint's error reply as the TransferError that names its reason."""
    reason, message = header.get("reason"), f"{header.get('message')} (endpoint {address})"
    if reason == "layout":
        return LayoutMismatch(message)
    if reason in REFUSAL_REASONS:
        return TransferRefused(reason, message)
    return TransferError(f"transfer {transfer_id}: endpoint refused ({reason}): {message}")


def _closed(transfer_id: str, address: str, received: int, num_blocks: int, detail: str = "") -> TransferError:
    return TransferError(f"transfer {transfer_id}: the prefill endpoint {address} closed the connection after {received} "
                         f"of {num_blocks} blocks ({detail}its process stopped or died); recompute the prefill")


def _check(got: list[int], want: list[int], transfer_id: str, first: int, count: int, first_local_id: int,
           address: str) -> None:
    bad = [k for k, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        raise TransferIntegrityError(
            f"transfer {transfer_id}: blocks {first}..{first + count - 1} (local ids {first_local_id}..) from "
            f"{address} failed their xxh3 checksum in segment {bad[0]} ({len(bad)} of {len(want)} segments bad): "
            "the bytes changed in flight or the prefill side reused a block before the pull finished; recompute "
            "the prefill")


def _described_iov(header: dict, pool: BlockPool, local_ids: list[int], checksums: bool = True) -> list:
    """shm, nixl: where the endpoint says a batch lies ([address, length] pieces) in its process's memory, with its
    checksums unless the pull confirms instead (`checksums` False: nixl straight into the blocks), or for nixl from
    GPU KV in its GPU's (no pid, no checksums); ValueError for a malformed description."""
    iov = header.get("iov")
    if header.get("mem") == "VRAM":
        well_formed = type(header.get("dev")) is int and header["dev"] >= 0 and "h" not in header
    else:
        pid, want = header.get("pid"), header.get("h")
        well_formed = type(pid) is int and pid > 0 and (
            isinstance(want, list) and len(want) == len(pool.segment_nbytes) if checksums else "h" not in header)
    if not (well_formed and isinstance(iov, list) and iov
            and all(isinstance(p, list) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p) for p in iov)
            and sum(p[1] for p in iov) == len(local_ids) * sum(pool.segment_nbytes)):
        raise ValueError(f"bad {header.get('k')} batch description {str(header)[:200]}")
    return iov


def _read_described(header: dict, pool: BlockPool, local_ids: list[int]) -> None:
    """shm: copy a batch the endpoint described (where it lies in its process) into the local blocks."""
    shm.read_remote(header["pid"], batch_iov(pool, local_ids), _described_iov(header, pool, local_ids))


class _NixlReads:
    """nixl: one pull's READs in flight (up to MAX_IN_FLIGHT, the oldest waited for first). From host memory with a
    fence (the pull asked for "direct"), each described batch is READ straight into its blocks and the pull ends
    with the endpoint's confirmation; READs still running when the pull fails go to the fence, which tells the
    blocks' owner when they are free again (read_fence.py). Without one, each batch is READ into a landing buffer,
    checked there against its checksums, then copied into its blocks while later ones move; a READ abandoned
    (failure, deadline, cancel) keeps its buffer, never the blocks. From GPU KV the landing buffers are in this
    pool's GPU memory, the copy is a device copy, and the pull ends with the endpoint's confirmation (on_device)."""

    MAX_IN_FLIGHT = 4

    def __init__(self, receiver: Receiver, nixl: NixlAgent, landing_for: Callable[[object], Landing],
                 pool: BlockPool, fence: ReadFence | None = None) -> None:
        self.receiver, self.nixl, self.landing_for, self.pool, self.fence = receiver, nixl, landing_for, pool, fence
        # (handle, landing or None when READ into the blocks, its buffer, header, local ids)
        self.in_flight: collections.deque = collections.deque()
        self.on_device = False  # a batch of GPU KV was read: no checksums, the endpoint confirms instead
        self.confirms = fence is not None  # the pull ends with the endpoint's confirmation, not with checksums

    def post(self, header: dict, ids: list[int]) -> None:
        r = self.receiver
        agent = header.get("agent")
        if not isinstance(agent, str):
            raise ValueError(f"nixl description without its agent {str(header)[:200]}")
        on_device = header.get("mem") == "VRAM"
        remote = np.asarray(_described_iov(header, self.pool, ids, checksums=not self.confirms), dtype=np.uint64)
        name = self.nixl.know(r.conn.address, agent, header.get("md"))
        self.on_device |= on_device
        self.confirms |= on_device
        while len(self.in_flight) >= self.MAX_IN_FLIGHT:
            self._land_oldest()
        if self.fence is not None and not on_device:
            local, remote = shm.aligned(batch_iov(self.pool, ids), remote)
            handle = self.nixl.post_read(name, local, remote)
            self.in_flight.append((handle, None, None, header, ids))
            return
        landing = self.landing_for(_gpu_of(self.pool) if on_device else None)
        nbytes = int(remote[:, 1].sum())
        buffer = landing.take(nbytes, r.deadline, lambda: r._time_left(header["i"]))
        try:
            ends = np.cumsum(remote[:, 1])
            local = np.stack([landing.address(buffer) + ends - remote[:, 1], remote[:, 1]], axis=1).astype(np.uint64)
            handle = self.nixl.post_read(name, local, remote, local_kind=landing.kind,
                                         local_device=landing.device_index, remote_kind=header.get("mem", "DRAM"),
                                         remote_device=header.get("dev", 0))
        except BaseException:
            landing.give_back(buffer)  # no READ was posted into it
            raise
        self.in_flight.append((handle, landing, buffer, header, ids))

    def finish(self) -> None:
        while self.in_flight:
            self._land_oldest()

    def _land_oldest(self) -> None:
        r = self.receiver
        handle, landing, buffer, header, ids = self.in_flight[0]
        try:
            self.nixl.wait(handle, r.deadline, lambda: r._time_left(header["i"]),
                           nbytes=len(ids) * sum(self.pool.segment_nbytes))
        except TransferTimeout:
            r._time_left(header["i"])  # the pull's own timeout message (or cancellation)
            raise
        except TransferError as e:
            raise TransferError(f"transfer {r.transfer_id}: {e} (blocks {header['i']}.. from {r.conn.address}); "
                                "recompute the prefill") from e
        self.in_flight.popleft()
        if landing is None:  # READ into the blocks: the endpoint's confirmation ends the pull
            return
        if landing.device is not None:
            try:
                _copy_on_device(buffer, self.pool, ids)
            finally:
                landing.give_back(buffer)
            return
        try:
            # Checked in the landing buffer, before any byte reaches the blocks: the batch is laid out segment-major
            # there (segment k of every block, then k+1), so segment k's checksum is one hash of one range.
            got, start = [], 0
            for nbytes in self.pool.segment_nbytes:
                got.append(xxhash.xxh3_64_intdigest(buffer[start:start + nbytes * len(ids)]))
                start += nbytes * len(ids)
            _check(got, header["h"], r.transfer_id, header["i"], len(ids), ids[0], r.conn.address)
            _scatter(buffer, batch_iov(self.pool, ids))
        finally:
            landing.give_back(buffer)

    def abandon(self) -> None:
        """After a failure: READs still in flight keep their landing buffers until they end (Landing.hold), or, READ
        into the blocks, go to the pull's fence."""
        while self.in_flight:
            handle, landing, buffer, _, _ = self.in_flight.popleft()
            if landing is None:
                self.fence.add(self.nixl, handle)
            else:
                landing.hold(handle, buffer)


def _gpu_of(pool: BlockPool):
    """The CUDA device of a pool of GPU KV; PathUnavailable for a pool in host memory (the pull goes over tcp)."""
    segments = getattr(pool, "device_segments", None)
    if not segments or segments[0].device.type != "cuda":
        raise PathUnavailable("the prefill worker's KV is on a GPU and this worker's is not: nixl moves GPU KV "
                              "between GPU workers")
    return segments[0].device


def _copy_on_device(buffer, pool: BlockPool, ids: list[int]) -> None:
    """GPU KV: a landed batch (segment-major: segment k of every block, then k+1) into its blocks, with cuda_ipc's
    copy kernel (one launch for every segment), or one index_copy_ per segment array where the kernel cannot run."""
    import torch

    from pdserve.kv import cuda_ipc

    local = pool.device_segments  # uint8 [num_blocks, bytes per block]
    sizes = [int(t.shape[1]) for t in local]
    starts = np.cumsum([0] + [n * len(ids) for n in sizes[:-1]]).tolist()
    try:
        table = cuda_ipc.copy_table([buffer.data_ptr() + o for o in starts], sizes, [t.data_ptr() for t in local],
                                    [t.stride(0) for t in local], sizes, range(len(ids)), ids)
        cuda_ipc.copy(table, buffer.device)
    except PathUnavailable:  # no Triton, or a layout not aligned for the kernel
        index = torch.as_tensor(ids, device=buffer.device)
        for t, start, n in zip(local, starts, sizes):
            t.index_copy_(0, index, buffer[start:start + n * len(ids)].view(len(ids), n))
        torch.cuda.current_stream(buffer.device).synchronize()


def _scatter(buffer: np.ndarray, local_iov: np.ndarray) -> None:
    """Copy the landing buffer's bytes, in order, into the local pieces ([address, length] in this process)."""
    offset, src = 0, buffer.ctypes.data
    for address, length in local_iov.tolist():
        ctypes.memmove(address, src + offset, length)
        offset += length


def _check_described(header: dict, pool: BlockPool, local_ids: list[int], transfer_id: str, address: str) -> None:
    """shm: the copied batch against the checksums the endpoint took when it described it."""
    # local_ids are the batch's own: its first is local_ids[0] (an IndexError here once hid the integrity error)
    _check(pieces_checksums(batch_pieces(pool, local_ids), len(pool.segment_nbytes)), header["h"], transfer_id,
           header["i"], len(local_ids), local_ids[0], address)
