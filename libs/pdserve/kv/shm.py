"""The same-host byte path ("shm"): the decode side copies the prefill side's blocks straight out of its memory
with process_vm_readv (cross-memory attach: the kernel copies between the two address spaces, one copy, no
socket, no shared allocation), so vLLM's own KV tensors are read in place.

The endpoint describes each batch (where its pieces lie, and their checksums taken at that moment); the client
reads the pieces into its own blocks and checks them. Who may read: the kernel lets a process read another of
the same user unless Yama forbids it (ptrace_scope 1: the endpoint allows its readers with PR_SET_PTRACER;
2 and 3: the path is not offered), and container runtimes' seccomp profiles often forbid the call (containers
have their own namespaces, so they never pick this path: host.py).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Sequence

import numpy as np

from pdserve.kv.errors import PathUnavailable, TransferError
from pdserve.kv.host import yama_ptrace_scope
from pdserve.kv.pool import coalesced

logger = logging.getLogger(__name__)

_IOV_MAX = 1024  # the kernel's limit of iovecs per call, each side
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)  # CDLL releases the GIL during calls: several reads run at once
_process_vm_readv = getattr(_libc, "process_vm_readv", None)
if _process_vm_readv is not None:
    _process_vm_readv.restype = ctypes.c_ssize_t
    _process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec),
                                  ctypes.c_ulong, ctypes.c_ulong]


class ShmUnavailable(PathUnavailable):
    """This pair of processes cannot read each other's memory (permissions, seccomp): use TCP."""


def address_of(view: memoryview) -> int:
    """The address of a (writable, contiguous) buffer in this process."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def offer() -> bool:
    """Whether this process can offer its memory to readers of the same user; under Yama's ptrace_scope 1 it
    allows them (PR_SET_PTRACER_ANY: no more than a same-user process without Yama may do)."""
    if _process_vm_readv is None:
        return False
    scope = yama_ptrace_scope()
    if scope >= 2:
        logger.info("kv shm path not offered: kernel.yama.ptrace_scope=%d forbids reading another process's "
                    "memory; same-host pulls use TCP", scope)
        return False
    if scope == 1 and _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0) != 0:
        logger.info("kv shm path not offered: PR_SET_PTRACER failed (errno %d)", ctypes.get_errno())
        return False
    return True


def available() -> bool:
    """Whether this process can make the call at all (a seccomp profile may forbid it): a read of itself."""
    if _process_vm_readv is None:
        return False
    src, dst = np.arange(16, dtype=np.uint8), np.zeros(16, dtype=np.uint8)
    try:
        read_remote(os.getpid(), [[address_of(memoryview(dst)), 16]], [[src.ctypes.data, 16]])
    except TransferError:
        return False
    return bool((src == dst).all())


def read_remote(pid: int, local: Sequence[Sequence[int]], remote: Sequence[Sequence[int]]) -> None:
    """Copy the bytes of process `pid` at `remote` ([address, length] pieces, in order) into `local` (the same
    number of bytes, cut into pieces of its own). ShmUnavailable when the kernel does not allow it; TransferError
    when the memory is not there any more (the process ended, or freed it)."""
    assert _process_vm_readv is not None
    local_vec, remote_vec = aligned(coalesced(np.asarray(local, dtype=np.uint64).reshape(-1, 2)),
                                     coalesced(np.asarray(remote, dtype=np.uint64).reshape(-1, 2)))
    for first in range(0, len(local_vec), _IOV_MAX):
        lv, rv = local_vec[first:first + _IOV_MAX], remote_vec[first:first + _IOV_MAX]
        want = int(lv[:, 1].sum())
        got = _process_vm_readv(pid, lv.ctypes.data_as(ctypes.POINTER(_IOVec)), len(lv),
                                rv.ctypes.data_as(ctypes.POINTER(_IOVec)), len(rv), 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else 0
            if err in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                raise ShmUnavailable(f"process_vm_readv of process {pid} refused ({os.strerror(err)}): the kernel "
                                     "does not let this process read the prefill worker's memory (Yama "
                                     "kernel.yama.ptrace_scope, or a seccomp profile); pulls go over TCP")
            why = os.strerror(err) if err else f"{got} of {want} bytes"
            raise TransferError(f"reading the prefill worker's memory (process {pid}) failed ({why}): the process "
                                "ended or freed the blocks; recompute the prefill")


def aligned(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both piece lists ([N, 2] of address, length) cut at the union of their boundaries, so that piece i of
    one side and piece i of the other have the same length: the kernel then pairs them call by call however
    the pieces are split into calls of at most _IOV_MAX."""
    local_ends, remote_ends = np.cumsum(local[:, 1]), np.cumsum(remote[:, 1])
    if local_ends[-1] != remote_ends[-1]:
        raise ValueError(f"{int(local_ends[-1])} local bytes for {int(remote_ends[-1])} remote bytes")
    cuts = np.union1d(local_ends, remote_ends)  # the end offset of every aligned piece
    starts = np.concatenate(([0], cuts[:-1])).astype(np.uint64)
    lengths = (cuts - starts).astype(np.uint64)

    def place(pieces: np.ndarray, ends: np.ndarray) -> np.ndarray:
        index = np.searchsorted(ends, starts, side="right")  # the piece each aligned piece starts in
        piece_start = ends[index] - pieces[index, 1]
        return np.stack([pieces[index, 0] + (starts - piece_start), lengths], axis=1)

    return np.ascontiguousarray(place(local, local_ends)), np.ascontiguousarray(place(remote, remote_ends))
