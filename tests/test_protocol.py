import orjson
import pytest

from pdserve.protocol import (SCHEMA_VERSION, CancelRequest, DecodeRequest, Heartbeat, InvalidMessage, KVLayout,
                              KVReady, KVTransferParams, ModelCard, PrefillRequest, SamplingParams, TokenChunk, Usage,
                              decode, encode)

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bf16", dtype_bytes=2, block_size=16)


def make_params() -> KVTransferParams:
    return KVTransferParams(worker_id="p1", address="tcp://10.0.0.1:5555", transfer_id="t1", token="secret",
                            block_ids=(3, 4), num_tokens=20, kv_layout=LAYOUT, lease_expires_at=1e9)


@pytest.mark.parametrize("msg", [
    PrefillRequest(request_id="r1", model="m", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=5, stop=("x",)), deadline=1e9),
    KVReady(request_id="r1", worker_id="p1", first_token_id=7, first_text="a", kv_transfer_params=make_params(), num_prompt_tokens=3),
    DecodeRequest(request_id="r1", model="m", prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=2), first_token_id=7,
                  kv_transfer_params=make_params(), stream_subject="s", stream_token="t" * 32, deadline=1e9),
    TokenChunk(request_id="r1", seq=3, token_ids=(1, 2), text="ab", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2)),
    Heartbeat(worker_id="w", role="decode", model=ModelCard(name="m", tokenizer="byte", max_model_len=64, kv_layout=LAYOUT),
              interval_s=1, sent_at=1.0, started_at=0.5),
    CancelRequest(request_id="r1", worker_id="w"),
])
def test_round_trip(msg):
    assert decode(encode(msg), type(msg)) == msg


def test_layout_sizes():
    assert LAYOUT.bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert LAYOUT.bytes_per_block == LAYOUT.bytes_per_token * 16


@pytest.mark.parametrize("data, problem", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (orjson.dumps({"type": "token_chunk", "schema_version": SCHEMA_VERSION, "request_id": "r", "seq": 0}), "expected message type"),
    (orjson.dumps({"type": "cancel", "schema_version": 99, "request_id": "r"}), "schema_version"),
    (orjson.dumps({"type": "cancel", "schema_version": SCHEMA_VERSION}), "invalid field"),
    (orjson.dumps({"type": "cancel", "schema_version": SCHEMA_VERSION, "request_id": ["r"]}), "invalid field"),
])
def test_invalid_messages_are_rejected_with_a_reason(data, problem):
    with pytest.raises(InvalidMessage, match=problem):
        decode(data, CancelRequest)


def test_sampling_params_validated():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, top_p=0)


def test_messages_are_frozen():
    msg = CancelRequest(request_id="r")
    with pytest.raises(Exception):
        msg.request_id = "other"
