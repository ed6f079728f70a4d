"""The mock engine's "model": pure functions of the prompt and sampling params, so tests can predict them.

- Output token i is drawn from a small alphabet by a hash of (prompt, sampling params, i); with
  temperature 0 the seed is ignored (greedy is deterministic whatever the seed).
- The KV bytes of each prompt block are a pattern seeded by the block's chained content, so decode can
  tell whether what it received is what prefill produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from pdserve.kv.hashing import HASH_SEED
from pdserve.protocol import FinishReason, SamplingParams
from pdserve.stopping import StopChecker

# Lower-case letters and spaces: printable, one byte per token under ByteTokenizer.
ALPHABET = b"abcdefghijklmnopqrstuvwxyz     "
_PATTERN_BYTES = 4096


def _sampling_key(prompt_token_ids: Sequence[int], sampling: SamplingParams) -> int:
    seed = 0 if sampling.temperature == 0 else (sampling.seed if sampling.seed is not None else 0)
    params = f"{sampling.temperature:.6f}|{sampling.top_p:.6f}|{seed}".encode()
    prompt = np.asarray(prompt_token_ids, dtype=np.int64).tobytes()
    return xxhash.xxh3_64_intdigest(params + prompt, seed=HASH_SEED)


def token_at(prompt_token_ids: Sequence[int], sampling: SamplingParams, index: int) -> int:
    """The index-th generated token (index 0 is the one prefill chooses)."""
    key = _sampling_key(prompt_token_ids, sampling)
    return ALPHABET[xxhash.xxh3_64_intdigest(index.to_bytes(8, "little"), seed=key) % len(ALPHABET)]


class TokenStream:
    """Generates tokens one by one with stop handling; prefill and decode both replay it."""

    def __init__(self, prompt_token_ids: Sequence[int], sampling: SamplingParams):
        self._key = _sampling_key(prompt_token_ids, sampling)
        self._sampling = sampling
        self._stop = StopChecker(sampling.stop)
        self.num_generated = 0
        self.finish_reason: FinishReason | None = None

    def next(self) -> tuple[int, str]:
        """(token id, text safe to emit now); sets finish_reason when this token ends the output."""
        assert self.finish_reason is None, "stream already finished"
        token = ALPHABET[xxhash.xxh3_64_intdigest(self.num_generated.to_bytes(8, "little"), seed=self._key) % len(ALPHABET)]
        self.num_generated += 1
        text = self._stop.feed(chr(token))
        if self._stop.stopped:
            self.finish_reason = "stop"
        elif self.num_generated >= self._sampling.max_tokens:
            self.finish_reason = "length"
            text += self._stop.flush()
        return token, text


@dataclass(frozen=True)
class Prediction:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


def predict(prompt_token_ids: Sequence[int], sampling: SamplingParams) -> Prediction:
    """Exactly what the mock engine returns for this prompt and sampling (for tests and clients)."""
    stream = TokenStream(prompt_token_ids, sampling)
    tokens, text = [], []
    while stream.finish_reason is None:
        token, piece = stream.next()
        tokens.append(token)
        text.append(piece)
    return Prediction("".join(text), tuple(tokens), stream.finish_reason)


def fill_prompt_kv(prompt_token_ids: Sequence[int], block_size: int, blocks: Sequence[np.ndarray],
                   first_block: int = 0) -> None:
    """Write the KV of each prompt block (full or partial) into `blocks` (uint8 arrays, one per block), from
    first_block on (those before hold KV loaded from elsewhere, which a check should find right, not rewritten)."""
    tokens = np.asarray(prompt_token_ids, dtype=np.int64)
    parent = 0
    for k, block in enumerate(blocks):
        parent = xxhash.xxh3_64_intdigest(
            parent.to_bytes(8, "little") + tokens[k * block_size : (k + 1) * block_size].tobytes(), seed=HASH_SEED
        )
        if k < first_block:
            continue
        pattern = np.random.default_rng(parent).integers(0, 256, size=_PATTERN_BYTES, dtype=np.uint8)
        flat = block.reshape(-1)
        reps = -(-flat.size // _PATTERN_BYTES)
        flat[:] = np.tile(pattern, reps)[: flat.size]
