"""One streamed request against canned server answers (httpx's mock transport): parsing, usage, failures."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from pdserve.bench.client import request_body, send_request
from pdserve.bench.workload import WorkItem

ITEM = WorkItem(index=3, prefix_id=1, prefix_text="the shared", suffix_text=" own words", num_prompt_tokens=4,
                max_tokens=5)


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def completion_chunk(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


def chat_chunk(**delta) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}


async def send(handler, *, timeout_s: float = 5.0, api: str = "completions"):
    seen: list[dict] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(recording)) as http:
        body = request_body(ITEM, api, "m", ignore_eos=True)
        result = await send_request(http, "http://test/v1/completions", body, ITEM, timeout_s, time.perf_counter())
    return result, seen


async def test_completions_stream_with_usage():
    def handler(_):
        return httpx.Response(200, content=sse(completion_chunk("a"), completion_chunk(""), completion_chunk("bc"),
                                               completion_chunk("d"), USAGE, b"[DONE]"))

    result, [body] = await send(handler)
    assert result.ok and result.error is None
    assert len(result.chunk_times_s) == 3  # the empty chunk carries no text
    assert (result.output_tokens, result.prompt_tokens) == (5, 9)  # from usage, not from counting chunks
    assert result.ttft_ms is not None and 0 <= result.ttft_ms <= result.e2e_ms
    assert body == {"model": "m", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
                    "prompt": "the shared own words", "ignore_eos": True}


async def test_chat_stream_counts_content_not_the_role_chunk():
    def handler(_):
        return httpx.Response(200, content=sse(chat_chunk(role="assistant", content=""), chat_chunk(content="hi"),
                                               chat_chunk(content=" there"), b"[DONE]"))

    result, [body] = await send(handler, api="chat")
    assert result.ok and len(result.chunk_times_s) == 2
    assert result.output_tokens == 2  # no usage chunk: one token per text chunk
    assert body["messages"] == [{"role": "system", "content": "the shared"}, {"role": "user", "content": "own words"}]


@pytest.mark.parametrize("response, error", [
    (httpx.Response(404, json={"error": {"message": "The model `m` does not exist.", "code": 404}}),
     "HTTP 404: The model `m` does not exist."),
    (httpx.Response(502, text="Bad Gateway"), "HTTP 502: Bad Gateway"),
    (httpx.Response(200, content=sse(completion_chunk("a"), {"error": {"message": "worker died"}}, b"[DONE]")),
     "error event: worker died"),
    (httpx.Response(200, content=sse(completion_chunk("a"))), "stream ended without [DONE]"),
    (httpx.Response(200, content=sse(USAGE, b"[DONE]")), "stream finished without any text"),
])
async def test_failures_become_error_texts(response, error):
    result, _ = await send(lambda _: response)
    assert not result.ok and result.error == error
    assert result.ttft_ms is None and result.end_s >= result.start_s


async def test_connection_errors_become_error_texts():
    def handler(request):
        raise httpx.ConnectError("All connection attempts failed", request=request)

    result, _ = await send(handler)
    assert not result.ok and result.error == "ConnectError: All connection attempts failed"


async def test_the_per_request_deadline_ends_a_stalled_stream():
    class Stalled(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield sse(completion_chunk("a"))
            await asyncio.sleep(30)

    started = time.monotonic()
    result, _ = await send(lambda _: httpx.Response(200, stream=Stalled()), timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert not result.ok and result.error == "timeout: no complete answer within 0.3s"
