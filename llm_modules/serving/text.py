"""Answer text as tokens arrive: incremental decoding and stop sequences, the way the OpenAI API returns them.

The whole answer is decoded each time (so multi-byte characters split over tokens come out whole), and
text that could still become a stop sequence is held back until it cannot; a stop sequence ends the
answer and is not part of it.
"""

from __future__ import annotations

from typing import Any, Sequence


class AnswerText:
    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to send (may be empty). Sets `stopped`."""
        self.ids.append(token_id)
        text = self._decoded()
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
            return ""
        hold = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        return self._take(text[: len(text) - hold])

    def flush(self) -> str:
        """At the end of the answer: whatever was held back (no stop sequence completed)."""
        if self.stopped:
            return ""
        return self._take(self._decoded().rstrip("\ufffd"))

    def _take(self, upto: str) -> str:
        new = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return new

    @property
    def text(self) -> str:
        """The answer as sent so far."""
        return self._decoded()[: self.sent]
