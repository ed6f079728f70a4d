"""The router's HTTP layer (services/router/api.py and the modules it wires) over a stand-in backend.

`FakeBackend` below is a stand-in for the orchestrator: it serves one model with the byte tokenizer and
answers with a scripted text, so these tests can predict every token and pin the wire format, the error
shapes and the generator's lifecycle. The end-to-end tests elsewhere run the same app over the real
backend (NATS, workers, engines). The last tests start a real uvicorn server and talk to it with the
official `openai` client, to prove the wire format is what that client expects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import openai
import pytest
import uvicorn

from pdserve.protocol import KVLayout, ModelCard, Usage
from pdserve.tokenizer import ByteTokenizer
from services.router.api import create_app
from services.router.backend import GenerateDelta, GenerateRequest
from services.router.errors import NoWorkerError, UpstreamError, UpstreamTimeout
from services.router.openai_request import DEFAULT_MAX_TOKENS

MODEL = "mock-model"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", dtype_bytes=2, block_size=16)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class FakeBackend:
    """Stand-in for the orchestrator: streams `reply` one character (= one byte token) per delta."""

    def __init__(self, *, reply: str = "Hello there!", max_model_len: int = 512):
        self.card = ModelCard(name=MODEL, tokenizer="byte", max_model_len=max_model_len, kv_layout=LAYOUT)
        self.reply = reply
        self.serving = True
        self.health_status = "ok"
        self.fail_at: int | None = None  # raise `failure` before delta number `fail_at`
        self.failure: Exception = UpstreamError("decode worker d-1 failed")
        self.hang_at: int | None = None  # block forever before delta number `hang_at`
        # wait before delta `swallow_cancel_at` until cancelled, then go on as if nothing happened: what
        # asyncio.wait_for did on Python 3.11 when the cancel and the awaited item came in one turn of the loop
        self.swallow_cancel_at: int | None = None
        self.swallowed_cancel = False
        self.end_early_at: int | None = None  # return without a finish reason before delta `end_early_at`
        self.requests: list[GenerateRequest] = []
        self.ended_by: dict[str, str] = {}  # request_id -> "completed" | "GeneratorExit" | "CancelledError" | ...
        self.hanging = asyncio.Event()

    def models(self) -> list[ModelCard]:
        return [self.card] if self.serving else []

    def tokenizer(self, model: str) -> ByteTokenizer:
        assert model == MODEL
        return ByteTokenizer()

    def health(self) -> dict:
        return {"status": self.health_status, "workers": [{"worker_id": "d-1", "role": "decode", "model": MODEL,
                                                           "num_requests_served": len(self.requests)}]}

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        text = self.reply[: request.sampling.max_tokens]
        finish = "length" if len(self.reply) > request.sampling.max_tokens else "stop"
        try:
            for i, char in enumerate(text):
                if i == self.fail_at:
                    raise self.failure
                if i == self.end_early_at:
                    break
                if i == self.hang_at:
                    self.hanging.set()
                    await asyncio.Event().wait()
                if i == self.swallow_cancel_at:
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        self.swallowed_cancel = True
                await asyncio.sleep(0)
                last = i == len(text) - 1
                yield GenerateDelta(
                    text=char, token_ids=(ord(char),), finish_reason=finish if last else None,
                    usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(text),
                                cached_tokens=0) if last else None,
                )
        except BaseException as e:
            # Clean-up that awaits, as the orchestrator's does (it sends cancels to workers): it must not be
            # cancelled again by whoever closed us.
            await asyncio.sleep(0.01)
            self.ended_by[request.request_id] = type(e).__name__
            raise
        self.ended_by.setdefault(request.request_id, "completed")


def chat_body(content: str = "Hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def completion_body(prompt="Once upon", **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, **fields}


def chat_prompt_ids(*messages: tuple[str, str]) -> tuple[int, ...]:
    tok = ByteTokenizer()
    return tuple(tok.encode(tok.apply_chat_template([{"role": r, "content": c} for r, c in messages])))


def sse_events(text: str) -> list:
    """`data: ...` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    events = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(backend):
    app = create_app(backend, served_model_names={"alias": MODEL}, max_body_bytes=64 * 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, *, param=None, code=None, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert contains in error["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]
    return error


# ------------------------------------------------------------------------------------ non-streaming


async def test_chat_completion_body_and_generate_request(client, backend):
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5, temperature=0.5, top_p=0.9, seed=7,
                                                                 stop=["\n", "END"], user="u-1", logprobs=False),
                          headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL and isinstance(body["created"], int)
    prompt_ids = chat_prompt_ids(("user", "Hi"))
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                             "total_tokens": len(prompt_ids) + 5}
    [req] = backend.requests
    assert req.request_id == body["id"] and req.model == MODEL and req.prompt_token_ids == prompt_ids
    assert req.sampling.max_tokens == 5 and req.sampling.temperature == 0.5 and req.sampling.top_p == 0.9
    assert req.sampling.seed == 7 and req.sampling.stop == ("\n", "END")
    assert req.traceparent == TRACEPARENT
    assert backend.ended_by[req.request_id] == "GeneratorExit" or backend.ended_by[req.request_id] == "completed"


async def test_text_completion_body(client, backend):
    r = await client.post("/v1/completions", json=completion_body(max_tokens=100))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hello there!", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == len("Once upon") and body["usage"]["completion_tokens"] == 12
    assert backend.requests[0].prompt_token_ids == tuple(b"Once upon")
    assert backend.requests[0].traceparent is None


@pytest.mark.parametrize("prompt", [[72, 105], [[72, 105]], ["Hi"]])
async def test_completion_prompt_forms(client, backend, prompt):
    r = await client.post("/v1/completions", json=completion_body(prompt, max_tokens=1))
    assert r.status_code == 200, r.text
    assert backend.requests[0].prompt_token_ids == (72, 105)


async def test_chat_content_parts_and_roles(client, backend):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}, {"role": "tool", "content": "42"}]
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
    expected = chat_prompt_ids(("developer", "Be brief."), ("user", "a\nb"), ("assistant", ""), ("tool", "42"))
    assert backend.requests[0].prompt_token_ids == expected


async def test_max_completion_tokens_wins_over_max_tokens(client, backend):
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=9, max_completion_tokens=2))
    assert r.status_code == 200
    assert backend.requests[0].sampling.max_tokens == 2 and r.json()["choices"][0]["message"]["content"] == "He"


async def test_default_max_tokens_is_capped_remaining_context(backend):
    backend.card = backend.card.model_copy(update={"max_model_len": 2000})
    small = FakeBackend(max_model_len=40)
    for b, expected in ((backend, DEFAULT_MAX_TOKENS), (small, 40 - len("Once upon"))):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(b)), base_url="http://r") as c:
            assert (await c.post("/v1/completions", json=completion_body())).status_code == 200
        assert b.requests[-1].sampling.max_tokens == expected
        assert b.requests[-1].sampling.temperature == 1.0 and b.requests[-1].sampling.top_p == 1.0


async def test_client_request_id_is_a_label_echoed_never_the_internal_key(client, backend):
    ids = set()
    for _ in range(2):  # two clients sending the same id get two requests of their own
        r = await client.post("/v1/completions", json=completion_body(), headers={"X-Request-Id": "abc.DEF_1-2"})
        request = backend.requests[-1]
        assert r.headers["x-request-id"] == "abc.DEF_1-2" == request.client_request_id
        assert r.json()["id"] == request.request_id and request.request_id.startswith("cmpl-")
        ids.add(request.request_id)
    assert len(ids) == 2
    for bad in ("has space", "x" * 129, "semi;colon"):  # not echoed, not kept
        r = await client.post("/v1/completions", json=completion_body(), headers={"X-Request-Id": bad})
        assert r.headers["x-request-id"].startswith("cmpl-") and r.json()["id"] == r.headers["x-request-id"]
        assert backend.requests[-1].client_request_id is None


async def test_malformed_traceparent_is_dropped(client, backend):
    await client.post("/v1/completions", json=completion_body(), headers={"traceparent": "00-nope"})
    assert backend.requests[0].traceparent is None


async def test_served_model_alias(client, backend):
    r = await client.post("/v1/completions", json=completion_body(model="alias", max_tokens=1))
    assert r.status_code == 200 and r.json()["model"] == "alias" and backend.requests[0].model == MODEL


async def test_one_log_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="services.router.request_log")
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    lines = [rec.getMessage() for rec in caplog.records if r.json()["id"] in rec.getMessage()]
    assert len(lines) == 1
    assert "max_tokens=3" in lines[0] and "status=200" in lines[0] and "stream=False" in lines[0]
    assert f"model={MODEL}" in lines[0] and "num_prompt_tokens=" in lines[0] and "duration_ms=" in lines[0]


# ------------------------------------------------------------------------------------ streaming


async def test_chat_stream_chunks(client, backend):
    r = await client.post("/v1/chat/completions",
                          json=chat_body(max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    request_id = r.headers["x-request-id"]
    for chunk in chunks:
        assert chunk["id"] == request_id and chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL
        assert isinstance(chunk["created"], int) and "usage" in chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["H", "e", "l"]
    assert chunks[4]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(chat_prompt_ids(("user", "Hi")))
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}
    assert len(chunks) == 6 and all(c["usage"] is None for c in chunks[:5])


async def test_completion_stream_chunks_without_usage(client):
    r = await client.post("/v1/completions", json=completion_body(max_tokens=2, stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ("H", None), ("e", "length")]


async def test_stream_error_before_first_delta_is_a_json_error(client, backend):
    backend.fail_at, backend.failure = 0, NoWorkerError("no live decode worker serves mock-model")
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert_openai_error(r, 503, code="no_worker", contains="no live decode worker")
    assert backend.ended_by[backend.requests[0].request_id] == "NoWorkerError"


async def test_stream_error_after_start_is_an_error_event(client, backend):
    backend.fail_at = 2
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["", "H", "e"]
    assert events[3] == {"error": {"message": "decode worker d-1 failed", "type": "server_error", "param": None,
                                   "code": "upstream_error"}}
    assert events[4] == "[DONE]" and len(events) == 5


async def test_stream_that_ends_without_finish_reason(client, backend):
    backend.end_early_at = 2
    r = await client.post("/v1/completions", json=completion_body(stream=True))
    events = sse_events(r.text)
    assert events[-2]["error"]["code"] == "upstream_error" and events[-1] == "[DONE]"
    r = await client.post("/v1/completions", json=completion_body())
    assert_openai_error(r, 502, code="upstream_error", contains="without a finish reason")


# ------------------------------------------------------------------------------------ errors


async def test_generate_raising_before_returning_a_generator(client, backend):
    def generate(request):
        raise NoWorkerError("no live prefill worker serves mock-model")

    backend.generate = generate
    for stream in (False, True):
        r = await client.post("/v1/completions", json=completion_body(stream=stream))
        assert_openai_error(r, 503, code="no_worker", contains="no live prefill worker")


async def test_unexpected_error_outside_generation_is_a_generic_500(backend):
    def models():
        raise RuntimeError("secret internals")

    backend.models = models
    transport = httpx.ASGITransport(create_app(backend), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
        for r in (await c.get("/v1/models"), await c.post("/v1/completions", json=completion_body())):
            error = assert_openai_error(r, 500, code="internal_error", contains=r.headers["x-request-id"])
            assert "secret" not in error["message"]


@pytest.mark.parametrize("failure,status,code", [
    (NoWorkerError("no live prefill worker serves mock-model"), 503, "no_worker"),
    (UpstreamTimeout("decode worker d-1 did not answer in 30s"), 504, "upstream_timeout"),
    (UpstreamError("prefill worker p-1 failed"), 502, "upstream_error"),
])
async def test_backend_errors_keep_status_code_and_message(client, backend, failure, status, code):
    backend.fail_at, backend.failure = 0, failure
    r = await client.post("/v1/completions", json=completion_body())
    assert_openai_error(r, status, code=code, contains=failure.message)


async def test_backend_error_mid_generation_non_stream(client, backend):
    backend.fail_at = 3
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert_openai_error(r, 502, code="upstream_error")


async def test_unexpected_backend_exception_is_a_generic_500(client, backend, caplog):
    backend.fail_at, backend.failure = 0, RuntimeError("secret internals")
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        error = assert_openai_error(r, 500, code="internal_error", contains=r.headers["x-request-id"])
        assert "secret" not in error["message"]
    assert any("secret internals" in (rec.exc_text or "") for rec in caplog.records)


async def test_backend_deadline_safety_net(backend, monkeypatch):
    monkeypatch.setattr("services.router.response.DEADLINE_GRACE_S", 0.0)
    backend.hang_at = 0
    app = create_app(backend, request_timeout_s=0.2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://r") as c:
        r = await c.post("/v1/completions", json=completion_body())
    assert_openai_error(r, 504, code="upstream_timeout", contains="0.2s")
    assert backend.ended_by[backend.requests[0].request_id] == "CancelledError"


@pytest.mark.parametrize("body,param,contains", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "Missing required parameter: 'model'"),
    (chat_body(max_tokens=0), "max_tokens", "greater than 0"),
    (chat_body(max_tokens="5"), "max_tokens", "valid integer"),
    (chat_body(max_completion_tokens=-1), "max_completion_tokens", "greater than 0"),
    (chat_body(temperature=2.5), "temperature", "less than or equal to 2"),
    (chat_body(top_p=0), "top_p", "greater than 0"),
    (chat_body(seed=1.5), "seed", "valid integer"),
    (chat_body(stream="yes"), "stream", "valid boolean"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (chat_body(stop=5), "stop", "string or a list of strings"),
    ({"model": MODEL, "messages": []}, "messages", "at least one message"),
    ({"model": MODEL, "messages": "hi"}, "messages", "valid list"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'system'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "only 'text' parts"),
])
async def test_invalid_chat_fields_are_400_naming_the_field(client, backend, body, param, contains):
    r = await client.post("/v1/chat/completions", json=body)
    assert_openai_error(r, 400, param=param, contains=contains)
    assert backend.requests == []


@pytest.mark.parametrize("prompt,contains", [
    (["a", "b"], "several prompts not supported"),
    ([[1], [2]], "several prompts not supported"),
    ([1, -1], "outside [0, 2**31)"),
    ([1, 2**31], "outside [0, 2**31)"),
    ([1, True], "list of token ids"),
    ([1, "a"], "list of token ids"),
    ([], "must not be empty"),
    (5, "list of token ids"),
])
async def test_invalid_prompts(client, prompt, contains):
    r = await client.post("/v1/completions", json=completion_body(prompt))
    assert_openai_error(r, 400, param="prompt", contains=contains)


async def test_semantic_prompt_errors(client):
    r = await client.post("/v1/completions", json=completion_body(""))
    assert_openai_error(r, 400, param="prompt", contains="must not be empty")
    r = await client.post("/v1/completions", json=completion_body([72, 300]))
    assert_openai_error(r, 400, param="prompt", contains="vocabulary has 256 tokens")
    r = await client.post("/v1/completions", json=completion_body(n=2))
    assert_openai_error(r, 400, param="n", contains="n>1 / several prompts not supported")


async def test_context_length_exceeded(client):
    r = await client.post("/v1/completions", json=completion_body("x" * 500, max_tokens=20))
    assert_openai_error(r, 400, param="prompt", code="context_length_exceeded", contains=(
        "This model's maximum context length is 512 tokens. However, you requested 520 tokens "
        "(500 in the prompt, 20 in the completion)."))
    r = await client.post("/v1/chat/completions", json=chat_body("x" * 600))
    assert_openai_error(r, 400, param="messages", code="context_length_exceeded", contains="no room")


async def test_unknown_model_is_404_listing_served_models(client, backend):
    r = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4"))
    assert_openai_error(r, 404, param="model", code="model_not_found",
                        contains=f"The model `gpt-4` does not exist. Served models: alias, {MODEL}.")
    backend.serving = False
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert_openai_error(r, 503, code="no_worker", contains="No live worker")


async def test_malformed_and_missing_bodies(client):
    r = await client.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, contains="Malformed JSON")
    r = await client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, contains="must be a JSON object")
    r = await client.post("/v1/chat/completions")
    assert_openai_error(r, 400, contains="body is missing")
    r = await client.post("/v1/chat/completions", content=json.dumps(chat_body()).encode(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert_openai_error(r, 400, contains="Content-Type: application/json")


async def test_body_over_the_limit_is_413(client, backend):
    r = await client.post("/v1/completions", json=completion_body("x" * 70_000))
    assert_openai_error(r, 413, contains="larger than the limit of 65536 bytes")

    async def chunked():  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b"x" * 10_000

    r = await client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert backend.requests == []


async def test_unknown_path_and_wrong_method(client):
    r = await client.get("/v1/nope")
    assert_openai_error(r, 404, contains="/v1/nope")
    assert r.headers["x-request-id"].startswith("req-")
    r = await client.get("/v1/chat/completions")
    assert_openai_error(r, 405, contains="GET")
    assert "POST" in r.headers["allow"]


# ------------------------------------------------------------------------------------ other endpoints


async def test_models_health_and_docs(client, backend):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in data["data"]] == [
        ("alias", "model", "pdserve", 512), (MODEL, "model", "pdserve", 512)]
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert_openai_error(await client.get("/v1/models/nope"), 404, param="model", code="model_not_found")

    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["workers"][0]["worker_id"] == "d-1"
    backend.health_status = "degraded"
    assert (await client.get("/health")).status_code == 503

    schema = (await client.get("/openapi.json")).json()
    assert {"ChatCompletionRequest", "CompletionRequest"} <= set(schema["components"]["schemas"])
    assert "requestBody" in schema["paths"]["/v1/chat/completions"]["post"]
    r = await client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()


# ------------------------------------------------------------------------------------ disconnects


async def _call_until_disconnect(app, backend: FakeBackend, body: dict, path: str, *, after) -> list[dict]:
    """Calls the ASGI app directly; the client 'disconnects' once `after(sent)` holds."""
    disconnect = asyncio.Event()
    body_sent = False
    sent: list[dict] = []

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"host", b"router")],
             "client": ("127.0.0.1", 1234), "server": ("router", 80)}
    call = asyncio.create_task(app(scope, receive, send))
    for _ in range(500):
        if await after(sent):
            break
        await asyncio.sleep(0.01)
    disconnect.set()
    done, _ = await asyncio.wait({call}, timeout=5)
    assert call in done, "the app did not notice the disconnect"
    call.result()
    return sent


async def test_stream_disconnect_closes_backend_generator(backend):
    backend.hang_at = 3
    app = create_app(backend)

    async def streamed_some(sent):
        return sum(1 for m in sent if m.get("body")) >= 3

    sent = await _call_until_disconnect(app, backend, chat_body(stream=True), "/v1/chat/completions",
                                        after=streamed_some)
    assert sent[0]["status"] == 200
    assert backend.ended_by[backend.requests[0].request_id] == "CancelledError"
    assert not any(m.get("body", b"").startswith(b"data: [DONE]") for m in sent)


async def test_stream_disconnect_ends_the_stream_even_when_the_cancel_is_swallowed():
    """A cancel lost below the router (asyncio.wait_for on 3.11 lost one when a chunk came in the same turn) must
    not leave the stream running to its end: uvicorn drops writes to a closed connection without a word, so the
    response itself stops at its next write. Seen: a dropped stream decoded all 400 tokens for nobody."""
    backend = FakeBackend(reply="x" * 300)
    backend.swallow_cancel_at = 3
    app = create_app(backend)

    async def streamed_some(sent):
        return sum(1 for m in sent if m.get("body")) >= 3

    sent = await _call_until_disconnect(app, backend, completion_body(stream=True, max_tokens=300), "/v1/completions",
                                        after=streamed_some)
    assert backend.swallowed_cancel
    assert backend.ended_by[backend.requests[0].request_id] == "GeneratorExit"  # closed, not run to its end
    assert sum(1 for m in sent if m.get("body")) <= 4, "the stream went on after the client left"


async def test_stream_disconnect_while_client_is_slow_closes_backend_generator(backend):
    """Disconnect while the router is suspended in send(), not in the backend: aclose() must propagate."""
    app = create_app(backend)
    block = asyncio.Event()
    disconnected = asyncio.Event()
    sends = 0

    async def receive():
        if not hasattr(receive, "done"):
            receive.done = True
            return {"type": "http.request", "body": json.dumps(completion_body(stream=True)).encode()}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal sends
        sends += 1
        if sends == 3:
            disconnected.set()
            await block.wait()  # a send that never completes, as to a stalled client

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "scheme": "http"}
    call = asyncio.create_task(app(scope, receive, send))
    done, _ = await asyncio.wait({call}, timeout=5)
    assert call in done, "the app did not notice the disconnect"
    call.result()
    assert backend.ended_by[backend.requests[0].request_id] == "GeneratorExit"


async def test_non_stream_disconnect_closes_backend_generator(backend):
    backend.hang_at = 2
    app = create_app(backend)

    async def backend_hangs(sent):
        return backend.hanging.is_set()

    sent = await _call_until_disconnect(app, backend, completion_body(), "/v1/completions", after=backend_hangs)
    assert sent == []  # nothing to say to a client that is gone
    assert backend.ended_by[backend.requests[0].request_id] == "CancelledError"


# ------------------------------------------------------------------------------------ real server, real client


@pytest.fixture
async def live_url(backend):
    """A real uvicorn server on a free port, serving the app over the stand-in backend."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(backend), log_config=None, access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await asyncio.wait_for(serving, 10)
    sock.close()


@pytest.fixture
async def oai(live_url):
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_openai_client_chat(oai, backend):
    r = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "Hello"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5

    stream = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


async def test_openai_client_completions(oai):
    r = await oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == "Hell" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("Once upon")

    stream = await oai.completions.create(model=MODEL, prompt=[72, 105], max_tokens=100, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == "Hello there!"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_client_errors(oai, backend):
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "model_not_found" and "Served models: mock-model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await oai.completions.create(model=MODEL, prompt="x" * 600, max_tokens=10)
    assert e.value.code == "context_length_exceeded"

    backend.fail_at = 3
    stream = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               stream=True)
    with pytest.raises(openai.APIError, match="decode worker d-1 failed"):
        async for _ in stream:
            pass


async def test_real_server_stream_disconnect_closes_backend_generator(live_url, backend):
    backend.hang_at = 2
    async with httpx.AsyncClient(base_url=live_url) as c:
        async with c.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content":"e"' in line:
                    break
    for _ in range(500):
        if backend.requests and backend.requests[0].request_id in backend.ended_by:
            break
        await asyncio.sleep(0.01)
    assert backend.ended_by[backend.requests[0].request_id] == "CancelledError"
