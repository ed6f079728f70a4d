"""Log lines that a peer can cause, bounded: at most `burst` per `period_s`, each field cut to a length.

A peer that sends 80,000 bad requests must not write 80,000 warnings (nor echo megabytes it chose into the
log): after the burst, lines are counted, and the next line that is let through says how many were held back.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_FIELD_CHARS = 120


def clip(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """str(value), cut to `limit` characters (with how much was cut), for fields a peer chose."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


class ThrottledLog:
    """A logger's warnings, at most `burst` per `period_s`; thread-safe."""

    def __init__(self, logger: logging.Logger, *, burst: int = 20, period_s: float = 10.0):
        assert burst > 0 and period_s > 0
        self._logger = logger
        self.burst = burst
        self.period_s = period_s
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._num_in_window = 0
        self.num_suppressed = 0  # held back since the last line let through

    def warning(self, message: str, *args: object) -> bool:
        """Log the warning (args clipped) unless the burst is spent; True if it was written."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.period_s:
                self._window_start, self._num_in_window = now, 0
            if self._num_in_window >= self.burst:
                self.num_suppressed += 1
                return False
            self._num_in_window += 1
            suppressed, self.num_suppressed = self.num_suppressed, 0
        if suppressed:
            message += f" ({suppressed} similar lines held back before this one)"
        self._logger.warning(message, *(clip(a) if isinstance(a, str) else a for a in args))
        return True
