"""The mock engine's part in prefix reuse across workers (services/router/prefix_reuse.py): leasing the leading
blocks of a prompt that its prefix cache holds to a peer, and loading a prompt's leading blocks from a peer's lease
instead of computing them. A mixin of MockEngine: it works on that engine's cache, pool, endpoint and client.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pdserve.kv import TransferError, TransferResult
from pdserve.kv.hashing import ROOT_HASH
from pdserve.protocol import KVTransferParams

if TYPE_CHECKING:
    from pdserve.engine.mock import _Held

log = logging.getLogger(__name__)


class PeerPrefixes:
    reuses_peer_prefixes = True

    async def _load_prefix(self, request_id: str, prompt_token_ids: tuple[int, ...], held: _Held,
                           prefix_kv: KVTransferParams) -> tuple[int, TransferResult] | None:
        """Pull the prompt's leading blocks that a peer holds (prefix_kv) and this cache lacks into the request's
        blocks: (the prompt tokens now loaded, the pull), the last prompt token being computed all the same. Any
        failure: None, and the prefill computes them."""
        first = held.num_cached + held.num_from_host
        last = min(len(prefix_kv.block_ids), len(prompt_token_ids) // self._layout.block_size)
        if last <= first:
            return None
        local_ids = held.block_ids[first:last]
        try:
            if prefix_kv.kv_layout != self._layout:
                raise TransferError(f"the peer's KV layout {prefix_kv.kv_layout} differs from this worker's")
            result = await self._pull(request_id, prefix_kv.model_copy(update={"block_ids": prefix_kv.block_ids[first:last]}),
                                      local_ids)
            if not self._kv_matches(prompt_token_ids[:last * self._layout.block_size], held.block_ids[:last]):
                raise TransferError("the pulled prefix differs from what this prompt's KV is")
        except TransferError as e:
            log.warning("request %s: prefix of %d blocks from %s not loaded (%s); computing it", request_id,
                        last - first, prefix_kv.worker_id, e)
            self._counters["num_prefix_peer_load_failures"] += 1
            return None
        self._count_pull(result)
        loaded = self._tokens_of(last, prompt_token_ids) - self._num_cached_tokens(held, prompt_token_ids)
        self._counters["num_prefix_peer_loaded_tokens"] += loaded
        self._counters["num_prefix_peer_loaded_bytes"] += result.num_bytes
        log.info("request %s: loaded %d prompt tokens (%d blocks) from %s's cache over %s in %.2f ms", request_id,
                 loaded, last - first, prefix_kv.worker_id, result.transport, result.seconds * 1000)
        return loaded, result

    async def lease_prefix(self, lease_id: str, block_hashes: tuple[int, ...], lease_s: float,
                           prefix_token_ids: tuple[int, ...] = ()) -> KVTransferParams | None:
        """The leading blocks of block_hashes this worker holds, open to one pull (the token) until
        release_kv(lease_id) or lease_s: those of its cache pinned, and those that continue them in its host tier
        copied back into fresh blocks (where there is room); None when not even the first is held."""
        if not self.config.prefix_caching or lease_id in self._held:
            return None
        hits = self._pin_cached_prefix(block_hashes)
        rest = list(block_hashes[len(hits):])
        in_host = self._host.leading(rest) if self._host is not None else 0
        fresh: list[int] = []
        if in_host and in_host <= len(self._free) + self._num_evictable():
            fresh = self._take_free(in_host)
            num_copied = self._copy_from_host(rest[:in_host], fresh)
            self._free.extend(fresh[num_copied:])
            fresh = fresh[:num_copied]
        num_held = len(hits) + len(fresh)
        if num_held < len(block_hashes) and self.kv_events:  # the router was told they are here: they are not
            self.kv_events.absent(block_hashes[num_held:])
        if not num_held:
            return None
        held = self._hold_cached(lease_id, hits + fresh, list(block_hashes[:num_held]), num_from_host=len(fresh))
        if fresh and self.kv_events:
            self.kv_events.stored(rest[:len(fresh)], block_hashes[len(hits) - 1] if hits else ROOT_HASH)
        return self._open_for_pull(lease_id, held, num_held * self._layout.block_size, lease_s)
