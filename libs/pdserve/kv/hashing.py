"""Chained block hashes of a token sequence, the same in router, broker and every engine.

Block k's hash covers tokens [0, (k+1)*block_size): hash(parent hash, tokens of block k), with a fixed
seed, so two processes (or machines) always agree. Only full blocks are hashed, as in vLLM's prefix cache.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

HASH_SEED = 0x9D5E  # fixed: every process must compute the same hashes


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    tokens = np.asarray(token_ids, dtype=np.int64)
    hashes: list[int] = []
    parent = 0
    for k in range(len(tokens) // block_size):
        block = tokens[k * block_size : (k + 1) * block_size]
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + block.tobytes(), seed=HASH_SEED)
        hashes.append(parent)
    return hashes
