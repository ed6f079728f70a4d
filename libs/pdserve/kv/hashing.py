"""Chained block hashes of a token sequence, the same in router, broker and every engine.

Block k's hash covers tokens [0, (k+1)*block_size): hash(parent hash, tokens of block k), with a fixed
seed, so two processes (or machines) always agree. Only full blocks are hashed, as in vLLM's prefix cache.
The parent of a prompt's first block is ROOT_HASH; because every hash names its whole prefix, the hashes of
a prompt are a path in a prefix tree (the KV broker's index) whatever the engine's own hashing is.
"""

from __future__ import annotations

import array
from typing import Sequence

import xxhash

HASH_SEED = 0x9D5E  # fixed: every process must compute the same hashes
ROOT_HASH = 0  # the parent of every prompt's first block


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of a prompt."""
    return chain_hashes(token_ids, block_size, ROOT_HASH)


def chain_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int) -> list[int]:
    """The hashes of the full blocks of token_ids, continuing the chain after the block hashed parent_hash
    (an engine reports blocks of a prompt's middle with their parent's hash)."""
    data = array.array("q", token_ids).tobytes()  # int64, as numpy's int64 bytes: ~1 ms for 32K tokens
    step = block_size * 8
    digest = xxhash.xxh3_64_intdigest
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(data) - step + 1, step):
        parent = digest(parent.to_bytes(8, "little") + data[start : start + step], seed=HASH_SEED)
        hashes.append(parent)
    return hashes
