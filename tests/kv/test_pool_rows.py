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
