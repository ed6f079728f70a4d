"""The mock engine's side of its host-memory KV tier (kv/host_tier.py): what it evicts from its prefix cache is
copied into the tier (and reported, so that the broker's index keeps it as host tier), and a prompt's blocks found
there are copied back into its fresh blocks. A mixin of MockEngine: it works on that engine's tier, pool and events.
"""

from __future__ import annotations


class HostTierCopies:
    def _evict(self, hashes: list[int], block_ids: list[int]) -> None:
        """Report evicted cached blocks, copied first into the host tier when there is one."""
        if self._host is not None:
            added, dropped = [], []
            for h, kv in zip(hashes, self._block_arrays(block_ids)):
                if h not in self._host:  # one copy per block there: a block copied back and evicted again has one
                    added.append(h)
                dropped += self._host.put(h, kv)
            if self.kv_events:
                self.kv_events.stored_host(added)
                if dropped:
                    self.kv_events.removed_host(dropped)
        if self.kv_events:
            self.kv_events.removed(hashes)

    def _copy_from_host(self, hashes: list[int], block_ids: list[int]) -> int:
        """Copy the host tier's blocks of hashes into block_ids, in order, up to the first it no longer has;
        returns how many were copied."""
        n = 0
        for h, out in zip(hashes, self._block_arrays(block_ids[:len(hashes)])):
            if not self._host.copy_out(h, out):
                break
            n += 1
        return n
