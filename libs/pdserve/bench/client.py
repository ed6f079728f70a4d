"""One streamed OpenAI request and its timings: when it was sent, when each piece of text arrived, usage.

Times are seconds on the run's clock (time.perf_counter() minus the run's start), so requests can be laid
on one timeline. The token counts come from the final usage chunk (`stream_options.include_usage`); a
server that ignores the option gets the number of text chunks instead, which is exact for servers that
stream one token per chunk and a lower bound otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.workload import WorkItem

MAX_ERROR_CHARS = 300  # error texts are aggregated by value: keep them short and free of bodies


@dataclass
class RequestResult:
    """What happened to one request. `ok` means the stream finished with [DONE] and streamed text."""

    index: int
    prefix_id: int | None
    max_tokens: int
    prompt_tokens: int
    start_s: float
    end_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0
    ok: bool = False
    error: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return (self.chunk_times_s[0] - self.start_s) * 1000 if self.ok else None

    @property
    def e2e_ms(self) -> float | None:
        return (self.end_s - self.start_s) * 1000 if self.ok else None

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        if not self.ok or self.output_tokens < 2:
            return None
        assert self.ttft_ms is not None and self.e2e_ms is not None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        if not self.ok:
            return []
        times = self.chunk_times_s
        return [(b - a) * 1000 for a, b in zip(times, times[1:])]


class _StreamError(Exception):
    """The server answered, but not with a finished stream; the message is the error text to count."""


def request_body(item: WorkItem, api: str, model: str, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": item.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = item.messages()
    else:
        body["prompt"] = item.prompt
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension; OpenAI-compatible servers without it ignore it
    return body


async def send_request(http: httpx.AsyncClient, url: str, body: dict[str, Any], item: WorkItem,
                       timeout_s: float, clock_zero: float) -> RequestResult:
    """Sends one streamed request; never raises except CancelledError. Failures land in `error`."""
    result = RequestResult(item.index, item.prefix_id, item.max_tokens, item.num_prompt_tokens,
                           start_s=time.perf_counter() - clock_zero)
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(http, url, body, result, clock_zero)
        result.ok = True
    except TimeoutError:
        result.error = f"timeout: no complete answer within {timeout_s:g}s"
    except httpx.TimeoutException as e:
        result.error = f"timeout: {type(e).__name__}"
    except httpx.HTTPError as e:
        result.error = _short(f"{type(e).__name__}: {e}")
    except _StreamError as e:
        result.error = _short(str(e))
    except Exception as e:  # a benchmark reports every failure and carries on, whatever it was
        result.error = _short(f"{type(e).__name__}: {e}")
    if not result.ok:
        result.end_s = time.perf_counter() - clock_zero
    return result


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult,
                  clock_zero: float) -> None:
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raw = await response.aread()
            raise _StreamError(f"HTTP {response.status_code}: {_error_message(raw)}")
        num_text_chunks, usage, done = 0, None, False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments and keep-alives
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                result.end_s = time.perf_counter() - clock_zero  # before closing the connection
                break
            event = json.loads(data)
            if event.get("error"):
                raise _StreamError(f"error event: {_error_message(data.encode())}")
            if _text_of(event):
                result.chunk_times_s.append(time.perf_counter() - clock_zero)
                num_text_chunks += 1
            usage = event.get("usage") or usage
    if not done:
        raise _StreamError("stream ended without [DONE]")
    if not num_text_chunks:
        raise _StreamError("stream finished without any text")
    if usage:
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)
    else:
        result.output_tokens = num_text_chunks


def _text_of(event: dict[str, Any]) -> str:
    """The text one chunk carries, completions or chat (reasoning models stream reasoning as text too)."""
    text = []
    for choice in event.get("choices") or ():
        if choice.get("text"):
            text.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if delta.get(key):
                text.append(delta[key])
    return "".join(text)


def _error_message(raw: bytes) -> str:
    """The OpenAI error shape's message when there is one, else the start of the body."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return _short(raw.decode(errors="replace").strip() or "(empty body)")
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return _short(str(error["message"]))
        if isinstance(error, str):
            return _short(error)
    return _short(str(payload))


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
