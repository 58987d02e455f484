"""Answer text as tokens arrive: incremental decoding and stop sequences, the way the OpenAI API returns them.

Each new token is decoded with the tokens of the previous step as context (so a tokenizer's handling of a
leading space cancels out and multi-byte characters split over tokens come out whole), which keeps the work
per token constant however long the answer grows. Text that could still become a stop sequence is held
back until it cannot; a stop sequence ends the answer and is not part of it.
"""

from __future__ import annotations

from typing import Any, Sequence


class AnswerText:
    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.decoded = ""  # the text of ids[:read]
        self.prefix = 0  # ids[prefix:read] were decoded last: the context for the next tokens
        self.read = 0
        self.sent = 0  # characters already handed out
        self.stopped = False
        self.stop: str | None = None  # the stop sequence that ended the answer

    def _tail(self) -> tuple[str, bool]:
        """(text of the tokens after `read`, whether its last character is complete)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=False)
        return after[len(before):], not after.endswith("\ufffd")

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to send (may be empty). Sets `stopped`."""
        self.ids.append(token_id)
        new, complete = self._tail()
        if not complete:  # an incomplete character: wait for the rest
            return ""
        # A stop sequence completed now ends inside the new text: search only from where it could start.
        start = max(0, len(self.decoded) - max((len(s) for s in self.stops), default=0))
        self.decoded += new
        self.prefix, self.read = self.read, len(self.ids)
        found = [(i, s) for s in self.stops if (i := self.decoded.find(s, start)) >= 0]
        if found:
            cut, self.stop = min(found, key=lambda f: f[0])
            self.stopped = True
            return self._take(cut)
        text = self.decoded
        hold = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def flush(self) -> str:
        """At the end of the answer: whatever was held back (no stop sequence completed)."""
        if self.stopped:
            return ""
        new, _ = self._tail()
        self.decoded += new.rstrip("\ufffd")
        self.prefix = self.read = len(self.ids)
        return self._take(len(self.decoded))

    def _take(self, end: int) -> str:
        """The text from what was sent up to `end` (a position in `decoded`), now counted as sent."""
        new = self.decoded[self.sent:end]
        self.sent = max(self.sent, end)
        return new

    @property
    def text(self) -> str:
        """The answer as sent so far."""
        return self.decoded[: self.sent]
