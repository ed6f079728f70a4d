"""API keys: clients send `Authorization: Bearer <key>`, as the OpenAI SDK does with its api_key.

Off when no key is configured (the default, for a router on 127.0.0.1). When on, every /v1 path needs a
key (as vLLM's --api-key); /health, /metrics and the API docs stay open for probes and scrapers.
Keys are compared in constant time: each key's SHA-256 is compared with compare_digest against every
configured key's, with no early exit, so neither the position of a wrong byte nor a key's length leaks.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

PROTECTED_PREFIX = "/v1"


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in keys]
        assert self._digests, "ApiKeys needs at least one key; pass None to turn keys off"

    def __len__(self) -> int:
        return len(self._digests)

    @staticmethod
    def protects(path: str) -> bool:
        return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")

    def allows(self, authorization: str | None) -> bool:
        """True when the Authorization header carries one of the keys as a Bearer token."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        presented = _digest(token.strip())
        match = False
        for digest in self._digests:
            match |= hmac.compare_digest(presented, digest)
        return match and scheme.lower() == "bearer"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
