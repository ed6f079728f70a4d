"""What the HTTP layer asks of the router's orchestration: the seam between the HTTP modules (api.py,
response.py) and the orchestrator (orchestrator.py); tests put a stand-in behind it."""

from __future__ import annotations

import time
from dataclasses import dataclass
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

    def remaining_s(self) -> float:
        return self.deadline - time.time()


@dataclass(frozen=True)
class GenerateDelta:
    """New text and tokens; the last delta has a finish_reason and usage."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class Backend(Protocol):
    def models(self) -> list[ModelCard]:
        """Models served by at least one live worker."""
        ...

    def tokenizer(self, model: str) -> Tokenizer: ...

    def health(self) -> dict:
        """{"status": "ok"|"degraded", "workers": [{worker_id, role, model, num_requests_served}, ...]}"""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Runs one request; raises errors.RouterError before the first delta when it cannot start."""
        ...
