"""Where the nixl path's READs land when they may not land in the KV blocks themselves (a pull without a ReadFence,
and GPU KV): registered buffers of the client's own, copied into the blocks once a READ completed (and, from host
memory, its checksums held; nixl_path.py says why). Host buffers for host KV, buffers in the GPU's memory for GPU
KV.

A buffer whose READ was abandoned (deadline, cancel) may still be written by that READ: it is held, and reused only
once NIXL says the READ ended; at close, buffers that never got there stay mapped for the life of the process.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from typing import Callable

import numpy as np

from pdserve.kv.errors import TransferTimeout
from pdserve.kv.nixl_path import NixlAgent

logger = logging.getLogger(__name__)

# Landing buffers a READ may still write into when their agent closed: never unmapped (a late write into unmapped
# memory would crash the process).
_NEVER_UNMAPPED: list = []


class Landing:
    """Registered buffers that READs land in before their bytes are copied into the KV blocks (see the module's
    note for why): host memory (numpy arrays), or with `device` (a torch CUDA device) that GPU's (torch tensors).
    Buffers come in power-of-two sizes from 1 MiB, are kept for reuse, and are bounded in all by max_nbytes; one
    whose READ was abandoned is held until its READ has ended."""

    MIN_NBYTES = 1 << 20

    def __init__(self, nixl: NixlAgent, max_nbytes: int = 256 << 20, device=None) -> None:
        self._nixl = nixl
        self.device = device
        self.kind, self.device_index = ("VRAM", device.index or 0) if device is not None else ("DRAM", 0)
        self.max_nbytes = max_nbytes
        self.nbytes = 0  # allocated in all
        self._free: dict[int, list] = {}  # free buffers by size
        self._held: list[tuple[object, object]] = []  # (READ handle still running, its buffer)
        self._cond = threading.Condition()
        self._keep: list = []  # the registrations and mmaps, alive as long as this

    def take(self, nbytes: int, deadline: float, check: Callable[[], None]):
        """A buffer of at least nbytes; waits (within `deadline`, calling check()) while all memory is in use."""
        size = max(self.MIN_NBYTES, 1 << (max(1, nbytes) - 1).bit_length())
        with self._cond:
            while True:
                self._reap()
                free = self._free.get(size)
                if free:
                    return free.pop()
                if self.nbytes + size <= self.max_nbytes or self.nbytes == 0:
                    self.nbytes += size
                    break
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"no NIXL landing buffer free by the pull's deadline ({self.nbytes} B in "
                                          f"use, {len(self._held)} held by abandoned READs)")
                check()
                self._cond.wait(0.01)
        try:
            return self._allocate(size)
        except BaseException:
            with self._cond:
                self.nbytes -= size
            raise

    def _allocate(self, size: int):
        if self.device is not None:
            import torch  # GPU KV only

            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._keep.append((buffer, self._nixl.register_region(buffer.data_ptr(), size, "VRAM",
                                                                  self.device_index)))
            return buffer
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # first touches of huge pages stall on a busy machine (pool.py)
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        buffer = np.frombuffer(memory, dtype=np.uint8)
        buffer[::4096] = 0  # touched now, not under the READ
        self._keep.append((memory, self._nixl.register_region(int(buffer.ctypes.data), size)))
        return buffer

    @staticmethod
    def address(buffer) -> int:
        """Where a buffer of this landing starts (in host or device memory)."""
        return buffer.data_ptr() if hasattr(buffer, "data_ptr") else buffer.ctypes.data

    def give_back(self, buffer) -> None:
        with self._cond:
            self._free.setdefault(buffer.nbytes, []).append(buffer)
            self._cond.notify()

    def hold(self, handle: object, buffer) -> None:
        """The buffer's READ was abandoned: reuse it only once that READ ended (done or failed)."""
        with self._cond:
            self._held.append((handle, buffer))

    def _reap(self) -> None:
        still = []
        for handle, buffer in self._held:
            if self._nixl.ended(handle):
                self._free.setdefault(buffer.nbytes, []).append(buffer)
            else:
                still.append((handle, buffer))
        self._held = still

    def close(self) -> None:
        """At the agent's close: buffers whose READs never ended stay mapped for the process's life (a late write
        into unmapped memory would crash it)."""
        with self._cond:
            self._reap()
            if self._held:
                _NEVER_UNMAPPED.extend(self._keep)
                logger.warning("nixl: %d landing buffers still targeted by READs that never ended are kept mapped",
                               len(self._held))
            else:  # unregistered before unmapped: the agent must not unregister memory that is gone (SIGSEGV)
                for _, registration in self._keep:
                    self._nixl.deregister_region(registration)
            self._keep, self._free, self._held = [], {}, []

    @property
    def num_held(self) -> int:
        with self._cond:
            self._reap()
            return len(self._held)
