"""The synthetic workload: one prompt and one output length per request, all deterministic from the seed.

Every random draw comes from its own numpy stream keyed by (seed, purpose, index), so request i's prompt
does not depend on how many requests there are, on the scheduling mode, or on the order of generation.

Shared prefixes model many users behind a few long system prompts: prefix k is a fixed word stream; a
request with input length L that picks prefix k starts with its first round(F * L) tokens, then continues
with words of its own. Requests of different lengths that pick the same prefix therefore still share the
shorter one's prefix exactly, which is what a prefix cache can reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pdserve.bench.config import BenchConfig
from pdserve.tokenizer import Tokenizer, load_tokenizer

# Common short English words: roughly one token each for the tokenizers of current LLMs, so that without
# a tokenizer the number of words is a fair stand-in for the number of tokens.
WORDS: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are as with his they at be this have from or one had by word
but not what all were we when your can said there use an each which she do how their if will up other about
out many then them these so some her would make like him into time has look two more write go see number no
way could people my than first water been call who oil its now find long down day did get come made may part
over new sound take only little work know place year live me back give most very after thing our just name
good sentence man think say great where help through much before line right too mean old any same tell boy
follow came want show also around form three small set put end does another well large must big even such
because turn here why ask went men read need land different home us move try kind hand picture again change
off play spell air away animal house point page letter mother answer found study still learn should world
""".split())

# Independent random streams: (seed, purpose, index) never collide across purposes.
_INPUT_LENS, _OUTPUT_LENS, _PREFIX_CHOICE, _PREFIX_WORDS, _REQUEST_WORDS, ARRIVALS = range(6)
_MAX_FIXUPS = 16  # re-tokenisation at a cut point moves the count by a token or two; never loop forever


@dataclass(frozen=True)
class WorkItem:
    """One request to send: its prompt in two parts and how many tokens to ask for."""

    index: int
    prefix_id: int | None  # which shared prefix it starts with; None when prompts share nothing
    prefix_text: str  # the shared part ("" without shared prefixes)
    suffix_text: str  # the request's own part
    num_prompt_tokens: int  # exact with a tokenizer, else the number of words
    max_tokens: int

    @property
    def prompt(self) -> str:
        return self.prefix_text + self.suffix_text

    def messages(self) -> list[dict[str, str]]:
        """Chat form: the shared prefix is the system prompt, the request's own words the user turn."""
        user = {"role": "user", "content": self.suffix_text.lstrip()}
        return [{"role": "system", "content": self.prefix_text}, user] if self.prefix_text else [user]


def rng_for(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, index])


def length_bounds(mean: int, dist: str, spread: float) -> tuple[int, int]:
    """The smallest and largest length `sample_lengths` can return.

    Lognormal is truncated at 3 standard deviations above the mean: one huge request would dominate a
    short run and could pass the model's context limit. Normal is truncated symmetrically around the mean
    (3 standard deviations, or less where that would reach lengths below 1), so the mean stays `mean`.
    """
    if dist == "fixed":
        return mean, mean
    if dist == "uniform":
        low = max(1, round(mean * (1 - spread)))
        return low, max(low, round(mean * (1 + spread)))
    if dist == "normal":
        low = max(1, math.floor(mean * (1 - 3 * spread)))
        return low, 2 * mean - low
    return 1, max(1, math.ceil(mean * (1 + 3 * spread)))


def sample_lengths(rng: np.random.Generator, n: int, mean: int, dist: str, spread: float) -> list[int]:
    """n integer lengths around `mean`; `spread` is half-width / mean (uniform) or std / mean (others)."""
    low, high = length_bounds(mean, dist, spread)
    if dist == "fixed":
        values = np.full(n, mean, dtype=float)
    elif dist == "uniform":
        values = rng.integers(low, high + 1, size=n).astype(float)
    elif dist == "normal":
        values = rng.normal(mean, spread * mean, size=n)
    elif dist == "lognormal":
        # Parameters chosen so the distribution's own mean and std / mean are `mean` and `spread`.
        sigma2 = math.log1p(spread**2)
        values = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), size=n)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return [int(v) for v in np.clip(np.rint(values), low, high)]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]


class _TokenCutter:
    """Cuts word streams at exact token counts with a real tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def ids(self, rng: np.random.Generator, num_tokens: int, leading_space: bool) -> list[int]:
        """At least num_tokens token ids of random words (every word is one token or more)."""
        num_words = max(num_tokens, 1)
        while True:
            text = (" " if leading_space else "") + " ".join(_words(rng, num_words))
            ids = self.tokenizer.encode(text)
            if len(ids) >= num_tokens:
                return ids
            num_words *= 2

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if text else 0


def build_workload(config: BenchConfig, tokenizer: Tokenizer | None = None) -> list[WorkItem]:
    """The run's requests, in index order. Loads `config.tokenizer` when set and no tokenizer is given."""
    if tokenizer is None and config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    n, seed = config.num_requests, config.seed
    input_lens = sample_lengths(rng_for(seed, _INPUT_LENS), n, config.input_len, config.input_len_dist,
                                config.input_len_spread)
    output_lens = sample_lengths(rng_for(seed, _OUTPUT_LENS), n, config.output_len, config.output_len_dist,
                                 config.output_len_spread)
    fraction = config.shared_prefix_fraction
    if fraction > 0:
        prefix_ids: list[int | None] = [int(k) for k in
                                        rng_for(seed, _PREFIX_CHOICE).integers(0, config.num_prefixes, size=n)]
    else:
        prefix_ids = [None] * n
    prefix_lens = [round(fraction * length) if k is not None else 0 for k, length in zip(prefix_ids, input_lens)]
    if tokenizer is None:
        return _word_items(seed, input_lens, output_lens, prefix_ids, prefix_lens)
    return _token_items(_TokenCutter(tokenizer), seed, input_lens, output_lens, prefix_ids, prefix_lens)


def _longest_per_prefix(prefix_ids: Sequence[int | None], prefix_lens: Sequence[int]) -> dict[int, int]:
    longest: dict[int, int] = {}
    for k, length in zip(prefix_ids, prefix_lens):
        if k is not None:
            longest[k] = max(longest.get(k, 0), length)
    return longest


def _word_items(seed: int, input_lens: list[int], output_lens: list[int], prefix_ids: list[int | None],
                prefix_lens: list[int]) -> list[WorkItem]:
    prefixes = {k: _words(rng_for(seed, _PREFIX_WORDS, k), length)
                for k, length in _longest_per_prefix(prefix_ids, prefix_lens).items()}
    items = []
    for i, (length, max_tokens, k, num_prefix) in enumerate(zip(input_lens, output_lens, prefix_ids, prefix_lens)):
        prefix = " ".join(prefixes[k][:num_prefix]) if k is not None else ""
        own = " ".join(_words(rng_for(seed, _REQUEST_WORDS, i), length - num_prefix))
        suffix = f" {own}" if prefix and own else own
        items.append(WorkItem(i, k, prefix, suffix, length, max_tokens))
    return items


def _token_items(cutter: _TokenCutter, seed: int, input_lens: list[int], output_lens: list[int],
                 prefix_ids: list[int | None], prefix_lens: list[int]) -> list[WorkItem]:
    """Algorithm: each prefix is the decoded first P tokens of its word stream; each request's own part is
    decoded from a word stream that starts with a space (so no token merges across the seam). Decoding a cut
    and encoding again can shift the count at the cut by a token; the own part is then shortened or
    lengthened a token at a time until the whole prompt has exactly the asked-for count (bounded tries)."""
    tok = cutter.tokenizer
    prefix_ids_of = {k: cutter.ids(rng_for(seed, _PREFIX_WORDS, k), length, leading_space=False)
                     for k, length in _longest_per_prefix(prefix_ids, prefix_lens).items()}
    items = []
    for i, (length, max_tokens, k, num_prefix) in enumerate(zip(input_lens, output_lens, prefix_ids, prefix_lens)):
        prefix = tok.decode(prefix_ids_of[k][:num_prefix]) if k is not None and num_prefix else ""
        num_prefix_actual = cutter.count(prefix)
        own_ids = cutter.ids(rng_for(seed, _REQUEST_WORDS, i), length, leading_space=bool(prefix))
        take = max(length - num_prefix_actual, 0)
        suffix = tok.decode(own_ids[:take]) if take else ""
        for _ in range(_MAX_FIXUPS):
            num_total = cutter.count(prefix + suffix)
            if num_total == length or not 0 <= take + length - num_total <= len(own_ids):
                break
            take += length - num_total
            suffix = tok.decode(own_ids[:take]) if take else ""
        items.append(WorkItem(i, k, prefix, suffix, cutter.count(prefix + suffix), max_tokens))
    return items
