"""The one INFO line per request that the router writes, whichever way the request ends."""

from __future__ import annotations

import logging
import time

from pdserve import tracing

logger = logging.getLogger(__name__)


class RequestLog:
    """The one INFO line per request, written once however the request ends."""

    def __init__(self, request_id: str, model: str, stream: bool, client_request_id: str | None = None):
        self.request_id, self.model, self.stream = request_id, model, stream
        self.client_request_id = client_request_id
        self.num_prompt_tokens = 0
        self.max_tokens = 0
        self._started = time.perf_counter()
        self._written = False

    def done(self, status: int, *, finish_reason: str | None = None, num_completion_tokens: int = 0,
             error: str | None = None) -> None:
        if self._written:
            return
        self._written = True
        logger.info(
            "request_id=%s client_request_id=%s model=%s num_prompt_tokens=%d max_tokens=%d stream=%s status=%d "
            "duration_ms=%.1f finish_reason=%s num_completion_tokens=%d error=%s trace_id=%s",
            self.request_id, self.client_request_id or "-", self.model, self.num_prompt_tokens, self.max_tokens, self.stream, status,
            (time.perf_counter() - self._started) * 1000, finish_reason, num_completion_tokens, error,
            tracing.trace_id_hex() or "-",
        )
