"""The router's ASGI middleware: names each request, checks its API key, enforces the body limit, stamps
X-Request-Id on the response. (Tracing and response counting are trace_http.py and metrics_http.py.)"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.router.auth import ApiKeys
from services.router.errors import REQUEST_ID_HEADER, PayloadTooLarge, Unauthorized, response_for

logger = logging.getLogger(__name__)

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ID_PREFIXES = {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or _new_request_id(request.url.path)


def _new_request_id(path: str) -> str:
    return _ID_PREFIXES.get(path, "req-") + uuid.uuid4().hex


class RequestContext:
    """ASGI middleware: names the request, checks its API key, enforces the body limit, stamps X-Request-Id.

    The key is checked before the body is read, so a client without one cannot make the router buffer
    anything. The body is read here in full (it is at most max_body_bytes) so an oversize one is refused
    before FastAPI parses anything, whether or not it declared a Content-Length; it is then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_keys: ApiKeys | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The id that keys work, subjects and cancels is always this router's own: two clients that send the
        # same X-Request-Id stay independent. The client's id is a label: logged, in spans, echoed back.
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        client_request_id = incoming if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming) else None
        request_id = _new_request_id(scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = request_id, client_request_id
        stamp = (REQUEST_ID_HEADER.lower().encode(), (client_request_id or request_id).encode())

        async def send_stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), stamp]}
            await send(message)

        refusal = self._check_key(scope)
        if refusal is not None:
            logger.info("request_id=%s status=401 path=%s error=%s", request_id, scope["path"], refusal.message)
            await response_for(refusal)(scope, receive, send_stamped)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            return  # the client left before it finished sending
        if isinstance(body, PayloadTooLarge):
            logger.info("request_id=%s status=413 error=%s", request_id, body.message)
            await response_for(body)(scope, receive, send_stamped)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_stamped)

    def _check_key(self, scope: Scope) -> Unauthorized | None:
        if self.api_keys is None or not self.api_keys.protects(scope["path"]):
            return None
        authorization = Headers(scope=scope).get("authorization")
        if self.api_keys.allows(authorization):
            return None
        if not authorization:
            return Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        return Unauthorized("Incorrect API key provided. Use one of the keys this server was started with "
                            "(--api-keys-file / PDSERVE_API_KEYS).")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | PayloadTooLarge | None:
        too_large = PayloadTooLarge(f"Request body is larger than the limit of {self.max_body_bytes} bytes.")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
