"""A transfer endpoint's ledger: which transfers may be pulled (their leases: token, blocks, expiry), which
are gone and why, and the endpoint's counters.

Kept apart from endpoint.py because it is the one part of the endpoint that any thread touches: the prefill
worker allows and releases transfers and reads the counters from its own threads while the endpoint's serving
thread looks leases up and counts what it sends. Everything here is under one lock; nothing here does I/O.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Sequence

FORGET_EXPIRED_AFTER_S = 600.0  # an allowed transfer nobody released is dropped this long after expiry
_REMEMBER_GONE = 4096  # released/expired ids kept so late pulls get the precise reason


@dataclass
class Lease:
    """One allowed transfer: who may read (token) which blocks until when (time.time() based)."""

    token: bytes
    block_ids: frozenset[int]
    expires_at: float
    released: bool = False


class Ledger:
    """One endpoint's leases, the transfers gone and why, its counters; every method takes the one lock."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks  # of the endpoint's pool: a lease names none beyond it
        self._lock = threading.Lock()
        self._allowed: dict[str, Lease] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stats = dict(num_blocks_sent=0, num_bytes_sent=0, num_transfers_served=0, num_transfers_refused=0)

    def allow(self, transfer_id: str, token: str, block_ids: Sequence[int], expires_at: float) -> None:
        """Let a pull presenting `token` read `block_ids` until `expires_at` (time.time() based)."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"transfer {transfer_id}: block ids {bad[:8]} outside the pool of {self.num_blocks}")
        if not token:
            raise ValueError(f"transfer {transfer_id}: an empty token would let anyone read the blocks")
        with self._lock:
            if transfer_id in self._allowed:
                raise ValueError(f"transfer {transfer_id} is already allowed; transfer ids must be unique")
            self._gone.pop(transfer_id, None)
            self._allowed[transfer_id] = Lease(token.encode(), frozenset(block_ids), expires_at)

    def release(self, transfer_id: str) -> bool:
        """Forget the transfer and mark its lease released (a pull in progress sees that at its next message).
        False if it was unknown or already released."""
        with self._lock:
            allowed = self._allowed.pop(transfer_id, None)
            if allowed is None:
                return False
            allowed.released = True
            self._remember_gone(transfer_id, "released")
        return True

    def lookup(self, transfer_id: str) -> tuple[Lease | None, str | None]:
        """The transfer's lease, or None and why it is gone ("released", "expired"; None if never allowed)."""
        with self._lock:
            return self._allowed.get(transfer_id), self._gone.get(transfer_id)

    def still_held(self, lease: Lease) -> bool:
        """Whether the lease was neither released nor past its expiry, as of now."""
        with self._lock:
            return not lease.released and time.time() <= lease.expires_at

    def forget_expired(self) -> list[str]:
        """Drop the leases that expired FORGET_EXPIRED_AFTER_S ago and nobody released; their transfer ids."""
        wall = time.time()
        with self._lock:
            stale = [t for t, a in self._allowed.items() if wall > a.expires_at + FORGET_EXPIRED_AFTER_S]
            for tid in stale:
                del self._allowed[tid]
                self._remember_gone(tid, "expired")
        return stale

    def count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, num_transfers_allowed=len(self._allowed))

    def _remember_gone(self, transfer_id: str, reason: str) -> None:
        self._gone[transfer_id] = reason
        while len(self._gone) > _REMEMBER_GONE:
            self._gone.popitem(last=False)
