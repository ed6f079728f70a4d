"""Cancels that arrive before their request.

NATS orders the messages of one subject, not of two: a router's cancel can overtake the request it cancels
(the worker handles each subscription in its own task), and a worker that then computed the request would
hold KV or decode to max_tokens for nobody. A worker remembers such cancels and refuses the request when it
arrives, for a bounded time (a request later than that has passed its deadline anyway) and a bounded number
(a flood of cancels for ids that never come costs bounded memory).
"""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_EARLY_CANCELS = 10_000


class EarlyCancels:
    def __init__(self, keep_s: float, max_entries: int = MAX_EARLY_CANCELS):
        assert keep_s > 0 and max_entries > 0
        self.keep_s = keep_s
        self.max_entries = max_entries
        # request_id -> (monotonic time of its cancel, the last attempt it covers; None: every attempt)
        self._when: OrderedDict[str, tuple[float, int | None]] = OrderedDict()

    def remember(self, request_id: str, attempt: int | None = None) -> None:
        now = time.monotonic()
        self._when.pop(request_id, None)
        self._when[request_id] = (now, attempt)
        while self._when and (len(self._when) > self.max_entries or next(iter(self._when.values()))[0] < now - self.keep_s):
            self._when.popitem(last=False)

    def take(self, request_id: str, attempt: int = 0) -> bool:
        """Whether this attempt of request_id was cancelled before it arrived (and is still remembered); forgets
        the cancel. A cancel of earlier attempts only (a resume on the same worker came after it) does not count."""
        entry = self._when.pop(request_id, None)
        if entry is None or entry[0] < time.monotonic() - self.keep_s:
            return False
        return entry[1] is None or attempt <= entry[1]

    def __len__(self) -> int:
        return len(self._when)
