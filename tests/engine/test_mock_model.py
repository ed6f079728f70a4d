import numpy as np

from pdserve.engine.mock_model import ALPHABET, TokenStream, fill_prompt_kv, predict
from pdserve.protocol import SamplingParams

PROMPT = tuple(b"<|user|>hello\n<|assistant|>")


def test_prediction_is_deterministic_and_has_max_tokens():
    sampling = SamplingParams(max_tokens=20, temperature=0.7, seed=3)
    first, second = predict(PROMPT, sampling), predict(PROMPT, sampling)
    assert first == second
    assert len(first.token_ids) == 20 and first.finish_reason == "length"
    assert all(t in ALPHABET for t in first.token_ids)
    assert first.text == bytes(first.token_ids).decode()


def test_output_depends_on_prompt_and_seed_but_greedy_ignores_seed():
    a = predict(PROMPT, SamplingParams(max_tokens=16, temperature=0.8, seed=1))
    b = predict(PROMPT, SamplingParams(max_tokens=16, temperature=0.8, seed=2))
    c = predict(PROMPT + (65,), SamplingParams(max_tokens=16, temperature=0.8, seed=1))
    assert a.text != b.text and a.text != c.text
    g1 = predict(PROMPT, SamplingParams(max_tokens=16, temperature=0, seed=1))
    g2 = predict(PROMPT, SamplingParams(max_tokens=16, temperature=0, seed=2))
    assert g1 == g2


def test_stop_string_ends_the_output_before_it():
    full = predict(PROMPT, SamplingParams(max_tokens=40, temperature=0))
    stop = full.text[10:12]
    cut = predict(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_stream_replays_the_prediction_token_by_token():
    sampling = SamplingParams(max_tokens=8, temperature=0)
    stream = TokenStream(PROMPT, sampling)
    tokens = [stream.next()[0] for _ in range(8)]
    assert tuple(tokens) == predict(PROMPT, sampling).token_ids
    assert stream.finish_reason == "length"


def test_kv_pattern_depends_on_the_prefix():
    blocks = [np.zeros(1000, np.uint8) for _ in range(2)]
    fill_prompt_kv(PROMPT, 16, blocks)
    other = [np.zeros(1000, np.uint8) for _ in range(2)]
    fill_prompt_kv((0,) + PROMPT[1:], 16, other)
    assert not np.array_equal(blocks[0], other[0])
    assert not np.array_equal(blocks[1], other[1])  # chained: block 1 differs through block 0
    again = [np.zeros(1000, np.uint8) for _ in range(2)]
    fill_prompt_kv(PROMPT, 16, again)
    assert all(np.array_equal(x, y) for x, y in zip(blocks, again))
