"""Pools whose blocks sit in rows other than their block ids (a staging pool) still move runs as one frame."""

from __future__ import annotations

import numpy as np

from pdserve.kv.pool import ArrayBlockPool, batch_pieces
from pdserve.kv import TransferClient, TransferEndpoint


class SlotPool:
    """Block ids mapped onto consecutive rows of a backing pool, like CudaStagingPool's pinned slots."""

    def __init__(self, rows: ArrayBlockPool, slots: dict[int, int]):
        self._rows, self._slots = rows, slots
        self.num_blocks, self.segment_nbytes, self.layout_tag = 1000, rows.segment_nbytes, "t"

    def segments(self, block_id):
        return self._rows.segments(self._slots[block_id])

    def row_of(self, block_id):
        return self._slots[block_id]

    def segment_span(self, k, first_row, n):
        return self._rows.segment_span(k, first_row, n)


def make_rows(seed: int) -> ArrayBlockPool:
    rng = np.random.default_rng(seed)
    return ArrayBlockPool([rng.integers(0, 256, (16, 1000), dtype=np.uint8), rng.integers(0, 256, (16, 24), dtype=np.uint8)])


async def test_scattered_blocks_in_consecutive_rows_move_as_runs_and_land_right():
    remote_ids, local_ids = [907, 13, 402, 55], [3, 999, 120, 64]
    src = SlotPool(make_rows(1), {b: 4 + i for i, b in enumerate(remote_ids)})
    dst = SlotPool(make_rows(2), {b: 9 + i for i, b in enumerate(local_ids)})
    assert len(batch_pieces(src, remote_ids)) == 2  # one view per segment, not one per block and segment
    endpoint = TransferEndpoint(src, bind_host="127.0.0.1")
    endpoint.start()
    client = TransferClient()
    try:
        endpoint.allow("t1", "secret", remote_ids, expires_at=1e12)
        result = await client.pull(endpoint.address, "t1", "secret", remote_ids, dst, local_ids, timeout_s=10)
    finally:
        client.close()
        endpoint.stop()
    assert result.num_blocks == 4
    for r, l in zip(remote_ids, local_ids):
        assert b"".join(src.segments(r)) == b"".join(dst.segments(l))


class PipelinedSlotPool(SlotPool):
    """A SlotPool with a staging pool's pipeline hooks (CudaStagingPool's, without a GPU), recording how the
    transport drives them: what the sender waited for before reading, what the receiver had when it committed."""

    def __init__(self, rows: ArrayBlockPool, slots: dict[int, int]):
        super().__init__(rows, slots)
        self.calls: list[tuple] = []

    def prepare_out(self, block_ids):
        self.calls.append(("prepare_out", tuple(block_ids)))

    def wait_out_segment(self, block_ids, k):
        self.calls.append(("wait_out_segment", tuple(block_ids), k))

    def wait_out(self, block_ids):
        self.calls.append(("wait_out", tuple(block_ids)))

    def commit_segment(self, block_ids, k):
        landed = [bytes(self.segments(b)[k]) for b in block_ids]
        self.calls.append(("commit_segment", tuple(block_ids), k, landed))


async def test_the_transport_drives_a_staging_pools_pipeline_segment_by_segment():
    remote_ids, local_ids = [907, 13, 402, 55], [3, 999, 120, 64]
    src = PipelinedSlotPool(make_rows(3), {b: 4 + i for i, b in enumerate(remote_ids)})
    dst = PipelinedSlotPool(make_rows(4), {b: 9 + i for i, b in enumerate(local_ids)})
    endpoint = TransferEndpoint(src, bind_host="127.0.0.1", batch_blocks=2)
    endpoint.start()
    client = TransferClient(transport="tcp")
    try:
        endpoint.allow("t1", "secret", remote_ids, expires_at=1e12)
        await client.pull(endpoint.address, "t1", "secret", remote_ids, dst, local_ids, timeout_s=10)
    finally:
        client.close()
        endpoint.stop()
    # Sender: the copies are asked for once, at the start; each batch waits for segment 0, then 1, before reading.
    assert src.calls == [("prepare_out", tuple(remote_ids)),
                         ("wait_out_segment", (907, 13), 0), ("wait_out_segment", (907, 13), 1),
                         ("wait_out_segment", (402, 55), 0), ("wait_out_segment", (402, 55), 1)]
    # Receiver: each segment committed once, in order, after its bytes (the sender's) had landed.
    assert [c[:3] for c in dst.calls] == [("commit_segment", (3, 999), 0), ("commit_segment", (3, 999), 1),
                                         ("commit_segment", (120, 64), 0), ("commit_segment", (120, 64), 1)]
    for _, ids, k, landed in dst.calls:
        remote = [remote_ids[local_ids.index(b)] for b in ids]
        assert landed == [bytes(src.segments(r)[k]) for r in remote]
