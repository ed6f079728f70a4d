"""The same-host GPU byte path ("cuda-ipc"): the decode side maps the prefill side's KV tensors into its own
CUDA context once per peer (CUDA IPC handles, cached, opened again when the peer restarts) and copies the
request's blocks device to device with one kernel over a table of segment addresses (not one op per layer or
per segment: with 2,048 segments of a 64 MiB transfer, launches would be the cost).

The endpoint answers a cuda-ipc pull with one message: the IPC handle of each storage behind its KV tensors,
where each segment array lies in it (offset, row stride, row length) and the rows of the requested blocks. The
client copies and then asks the endpoint whether the transfer was still held when the copy ended ("done"): a
transfer released meanwhile may have had its blocks reused under the copy, so the pull fails and decode
recomputes. That check replaces the checksums of the host paths (hashing on the device would cost a pass over
the bytes, and nothing changes bytes in flight here: only reuse can).

Works between processes on one GPU, and between GPUs of one host where peer access is possible.
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import Sequence

import numpy as np
import torch

from pdserve.kv.errors import PathUnavailable

logger = logging.getLogger(__name__)

CHUNK_NBYTES = 32 << 10  # what one program of the copy kernel moves


def device_segments(pool) -> list[torch.Tensor] | None:
    """The pool's KV as CUDA tensors [num_blocks, bytes per block] (uint8), or None for host pools."""
    segments = getattr(pool, "device_segments", None)
    if segments is None or not segments or segments[0].device.type != "cuda":
        return None
    return list(segments)


def describe(segments: Sequence[torch.Tensor]) -> list[dict]:
    """What a peer needs to map these tensors: per segment array, its storage's IPC handle and where the array
    lies in that storage. Torch's own sharing of CUDA storages (what torch.multiprocessing sends), as JSON."""
    described = []
    for t in segments:
        storage = t.untyped_storage()
        (device, handle, size, offset_bytes, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
        described.append({
            "device": int(device), "handle": _b64(handle), "size": int(size), "storage_offset": int(offset_bytes),
            "ref_handle": _b64(ref_handle), "ref_offset": int(ref_offset), "event_handle": _b64(event_handle),
            "event_sync": bool(event_sync),
            "offset": int(t.data_ptr() - storage.data_ptr()), "stride": int(t.stride(0) * t.element_size()),
            "row_nbytes": int(t.shape[1] * t.element_size()), "num_rows": int(t.shape[0]),
        })
    return described


class PeerMemory:
    """The peers' KV storages opened in this process, by IPC handle and offset (the caching allocator puts several
    tensors in one allocation, so one handle can stand for several storages): opened once, kept while the peer
    lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._storages: dict[tuple[str, int], torch.UntypedStorage] = {}

    def base_addresses(self, described: list[dict]) -> list[int]:
        """Device address of row 0 of each segment array of the peer."""
        bases = []
        with self._lock:
            for d in described:
                key = (d["handle"], d["storage_offset"])
                storage = self._storages.get(key)
                if storage is None:
                    storage = torch.UntypedStorage._new_shared_cuda(
                        d["device"], base64.b64decode(d["handle"]), d["size"], d["storage_offset"],
                        base64.b64decode(d["ref_handle"]), d["ref_offset"], base64.b64decode(d["event_handle"]),
                        d["event_sync"])
                    self._storages[key] = storage
                bases.append(storage.data_ptr() + d["offset"])
        return bases

    def forget(self, described: list[dict]) -> None:
        """Drop a peer's storages (it restarted, or its memory failed us)."""
        with self._lock:
            for d in described:
                self._storages.pop((d["handle"], d["storage_offset"]), None)


def copy_table(src_bases: Sequence[int], src_strides: Sequence[int], dst_bases: Sequence[int],
               dst_strides: Sequence[int], row_nbytes: Sequence[int], src_rows: Sequence[int],
               dst_rows: Sequence[int], chunk_nbytes: int = CHUNK_NBYTES) -> np.ndarray:
    """[N, 3] int64 rows of (source address, destination address, bytes), one per chunk of at most chunk_nbytes
    of every segment of every block; segment arrays of one row length at once (a layout has one or two)."""
    params = np.array([src_bases, src_strides, dst_bases, dst_strides, row_nbytes], dtype=np.int64).T
    src_rows_a = np.asarray(src_rows, dtype=np.int64)[None, :, None]
    dst_rows_a = np.asarray(dst_rows, dtype=np.int64)[None, :, None]
    parts = []
    for n in np.unique(params[:, 4]):
        sb, ss, db, ds = (params[params[:, 4] == n][:, i][:, None, None] for i in range(4))
        starts = np.arange(0, n, chunk_nbytes, dtype=np.int64)[None, None, :]
        src = sb + src_rows_a * ss + starts
        dst = db + dst_rows_a * ds + starts
        lengths = np.broadcast_to(np.minimum(chunk_nbytes, n - starts), src.shape)
        parts.append(np.stack([src.ravel(), dst.ravel(), lengths.ravel()], axis=1))
    return np.concatenate(parts)


_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def copy_chunks(table, CHUNK_WORDS: tl.constexpr):
            # One program per chunk: 8-byte words from the source address to the destination address. The
            # addresses are 16-byte aligned (copy() checks), which lets the loads and stores be 16 bytes wide.
            pid = tl.program_id(0)
            src = tl.multiple_of(tl.load(table + pid * 3), 16).to(tl.pointer_type(tl.int64))
            dst = tl.multiple_of(tl.load(table + pid * 3 + 1), 16).to(tl.pointer_type(tl.int64))
            num_words = tl.load(table + pid * 3 + 2) // 8
            offsets = tl.max_contiguous(tl.multiple_of(tl.arange(0, CHUNK_WORDS), CHUNK_WORDS), CHUNK_WORDS)
            mask = offsets < num_words
            tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)

        _kernel = copy_chunks
    return _kernel


class _TableBuffers:
    """A pinned host buffer and a device buffer per device, reused by every copy (growing when a table is
    larger): allocating pinned memory costs about a millisecond, more than a 64 MiB copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def copy(self, table: np.ndarray, device: torch.device, chunk_nbytes: int) -> None:
        with self._lock, torch.cuda.device(device):
            host, dev = self._buffers.get(device, (None, None))
            if host is None or host.shape[0] < len(table):
                size = max(len(table), 4096)
                host = torch.empty((size, 3), dtype=torch.int64, pin_memory=True)
                dev = torch.empty((size, 3), dtype=torch.int64, device=device)
                self._buffers[device] = (host, dev)
            host[:len(table)].numpy()[:] = table
            on_device = dev[:len(table)]
            on_device.copy_(host[:len(table)], non_blocking=True)
            launch(on_device, chunk_nbytes)
            torch.cuda.current_stream(device).synchronize()  # also keeps the buffers from being reused early


_tables = _TableBuffers()


def copy(table: np.ndarray, device: torch.device, chunk_nbytes: int = CHUNK_NBYTES) -> None:
    """Run the copies of `table` on `device` with one kernel launch, and wait for them."""
    if len(table) == 0:
        return
    if (table[:, :2] % 16).any() or (table[:, 2] % 8).any():
        raise PathUnavailable("cuda-ipc copies 16-byte aligned runs of 8-byte words: a segment of this layout is "
                              "not aligned so")
    _tables.copy(table, device, chunk_nbytes)


def launch(table_on_device: torch.Tensor, chunk_nbytes: int = CHUNK_NBYTES) -> None:
    """The copy kernel over a table already on the device (on the current stream; does not wait)."""
    try:
        kernel = _triton_kernel()
    except ImportError as e:
        raise PathUnavailable(f"cuda-ipc needs Triton for its copy kernel ({e}); install triton (vLLM's CUDA "
                              "build brings it)") from e
    kernel[(len(table_on_device),)](table_on_device, CHUNK_WORDS=chunk_nbytes // 8, num_warps=8)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode() if value else ""
