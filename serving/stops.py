"""Stop strings over a growing decoded text, and when streamed text is safe to send.

Text that might still turn into a stop string (a suffix that is a prefix of one) or that ends in an
incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the next token decides it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class StopChecker:
    """Feed it the full decoded completion after every token; it says what to emit next."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emitted = 0
        self.text = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit). After a hit, the stop and what follows are dropped."""
        self.text = text
        hit = self._first_stop(text)
        if hit is not None:
            out = text[self.emitted : hit]
            self.emitted = hit
            self.text = text[:hit]
            return out, True
        safe = len(text) - self._held_back(text)
        if safe <= self.emitted:
            return "", False
        out = text[self.emitted : safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        """Whatever was held back, at the end of the request."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _first_stop(self, text: str) -> int | None:
        # Only the part not yet emitted can hold a new match (plus its overlap with emitted text).
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.emitted - longest + 1)
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        held = len(text) - len(text.rstrip(REPLACEMENT))
        if held:
            return held
        for n in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) and s != tail for s in self.stops):
                return n
        return 0
