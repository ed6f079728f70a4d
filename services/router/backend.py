"""What the HTTP layer asks of the router's orchestration: the seam between api.py and orchestrator.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from pdserve.protocol import FinishReason, ModelCard, SamplingParams, Usage
from pdserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline: float  # unix time; the whole request must end by then
    traceparent: str | None = None
    client_request_id: str | None = None  # the client's X-Request-Id: a label only (logs, spans), never a key


@dataclass(frozen=True)
class GenerateDelta:
    """New text and tokens; the last delta has a finish_reason and usage."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class BackendError(Exception):
    """A request the backend cannot serve; `status` is the HTTP status the client should see."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NoWorkerError(BackendError):
    """No live worker of a role serves the model (503)."""

    status = 503
    code = "no_worker"


class BusUnavailable(BackendError):
    """The router's NATS connection is down (it reconnects by itself): 503 at once, with Retry-After."""

    status = 503
    code = "bus_unavailable"
    retry_after_s = 1.0


class RequestTooLarge(BackendError):
    """The request does not fit in one message on the bus (413)."""

    status = 413
    code = "payload_too_large"


class Overloaded(BackendError):
    """Every worker that could take the request is full, or its deadline cannot be met (429 + Retry-After)."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamTimeout(BackendError):
    """A worker did not answer within its deadline and no other could take over (504)."""

    status = 504
    code = "upstream_timeout"


class UpstreamError(BackendError):
    """A worker failed the request and no other could take over (502)."""

    status = 502
    code = "upstream_error"


class Backend(Protocol):
    def models(self) -> list[ModelCard]:
        """Models served by at least one live worker."""
        ...

    def tokenizer(self, model: str) -> Tokenizer: ...

    def health(self) -> dict:
        """{"status": "ok"|"degraded", "workers": [{worker_id, role, model, num_requests_served}, ...]}"""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Runs one request; raises BackendError before the first delta when it cannot start."""
        ...
