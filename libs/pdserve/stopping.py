"""Stop strings over a stream of text pieces: what may be shown now, and where the output ends.

Text that might be the start of a stop string is held back until the next piece decides; once a stop
string appears, the output ends just before it (OpenAI semantics: the stop string is not returned).
"""

from __future__ import annotations

from typing import Sequence


class StopChecker:
    def __init__(self, stop: Sequence[str]):
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return the text that is now safe to emit."""
        assert not self.stopped, "feed after stop"
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        # Only prefixes no longer than the text can end it: a client's 300 KB stop string costs what the text does.
        hold = max((n for s in self._stop for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                   default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The request ended without a stop string: release what was held back."""
        text, self._pending = self._pending, ""
        return text
