"""What a KV transfer reports: its result, and the errors that make decode recompute the prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

REFUSAL_REASONS = frozenset({"unknown", "released", "expired", "bad_token", "bad_block", "busy"})


class TransferError(Exception):
    """A KV transfer failed; the message names the cause and the fix. Decode falls back to recompute."""


class TransferRefused(TransferError):
    """The endpoint would not serve the pull; `.reason` is one of REFUSAL_REASONS."""

    _DEFAULT_MESSAGES = {
        "unknown": "the transfer is unknown to the endpoint; check the address and transfer_id",
        "released": "the transfer was already released by the prefill side; pull before releasing",
        "expired": "the transfer's lease expired; pull sooner or lengthen the prefill lease",
        "bad_token": "wrong or missing token; pass the token from the same KV-ready message",
        "bad_block": "block ids outside the transfer's allowed set; pull only the block_ids that were allowed",
        "busy": "the endpoint serves its limit of pulls at once; retry, or recompute the prefill",
    }

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"{reason}: {self._DEFAULT_MESSAGES.get(reason, 'refused')}")


class PathUnavailable(TransferError):
    """A same-host path cannot work between these two processes (permissions, no Triton, no peer access): the
    pull goes over TCP instead."""


class TransferTimeout(TransferError):
    """No (complete) answer within timeout_s: the endpoint is stalled, gone or unreachable."""


class PeerUnreachable(TransferTimeout):
    """No connection to the endpoint could be made within the connect deadline (wrong advertised address, no
    route, a firewall that drops or refuses its port): unlike a stalled transfer, the path itself does not work.
    The puller marks the pair and later requests do not pay for it again (see the decode worker's peer_paths)."""


class TransferIntegrityError(TransferError):
    """A block's checksum did not match the bytes that arrived."""


class LayoutMismatch(TransferError):
    """The two pools disagree on segment sizes, segment count or layout tag."""


@dataclass(frozen=True)
class TransferResult:
    num_blocks: int
    num_bytes: int
    seconds: float
    transport: str = "tcp"  # the path the bytes took (wire.PATHS)
    # The bytes were written into the pool's device memory itself (cuda-ipc, nixl from GPU KV): a staging pool has
    # nothing in its host slots to commit.
    landed_on_device: bool = False

    @property
    def gbps(self) -> float:
        """Throughput in gigabytes (1e9 bytes) per second, not gigabits."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def describe_layout(segment_nbytes: Sequence[int], layout_tag: str) -> str:
    sizes = tuple(segment_nbytes)
    if sizes and len(set(sizes)) == 1:
        shown = f"{len(sizes)} segment(s) of {sizes[0]} B"
    else:
        shown = f"segments {sizes}"
    return f"{shown} per block, layout_tag={layout_tag!r}"
