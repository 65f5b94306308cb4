"""Where a speech ends: at a sentence end near the chat's length, else at a word boundary with "…"; a
quotation still open there is closed.

The engine generates a little past the target length (up to SLACK more) and asks `settle` after every
chunk how much of the text is final so far and whether it has found the ending, which it often knows
before it reaches a sentence end after the target. docs/engine.md has
the rules; tests/test_endings.py checks each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SLACK = 0.25  # a speech may be this much shorter or longer than asked
ELLIPSIS = "…"
# A sentence ends at ., ! or ? and any closing quotes after it; in generated text only where whitespace
# follows, so that "U.S.A" and "3.5" are not ends (the whitespace is generated but not kept).
SENTENCE_END = r"[.!?][\"”’']*"
_SENTENCE_END = re.compile(SENTENCE_END + r"(?=\s)")
_WORD_BOUNDARY = re.compile(r"(?<=\S)\s")
_DANGLING = " \t\n,;:-–—"  # dropped before an ellipsis


def closing_quote(text: str, opened: bool = False) -> str:
    """What closes the quotation `text` ends inside: ” after more “ than ”, " after an odd number of
    straight double quotes (the training text's only kind: model.text.KEYBOARD_EQUIVALENTS), else "".
    `opened`: the text continues one that left a straight quote open (a prompt)."""
    if text.count("“") > text.count("”"):
        return "”"
    return '"' if (text.count('"') + opened) % 2 else ""


def quote_is_open(text: str, opened: bool = False) -> bool:
    """Whether `text` ends inside a quotation (closing_quote says what closes it)."""
    return bool(closing_quote(text, opened))


@dataclass(frozen=True)
class Ending:
    """A continuation of about `target` characters that may hold at most `limit` (both at least 1);
    `quoted`: the text it continues left a quotation open (quote_is_open)."""

    target: int
    limit: int
    quoted: bool = False

    @property
    def low(self) -> int:
        return min(math.ceil(self.target * (1 - SLACK)), self.high)

    @property
    def high(self) -> int:
        return max(1, min(math.floor(self.target * (1 + SLACK)), self.limit))

    @property
    def to_generate(self) -> int:
        """Characters to generate at most: one past `high`, to see whether a sentence ends there."""
        return self.high + 1


def settle(text: str, ending: Ending, exhausted: bool) -> tuple[int, str | None]:
    """How much of `text` (the continuation so far) is certain to begin the speech, and the speech's
    whole continuation once it is decided (None while more text could find a better ending).

    The ending is the sentence end nearest `target` among the last one up to it (if at least `low`) and
    the first one after it (if at most `high`). Without either, the text is cut at the word boundary
    nearest `target` in [low, high) and gets an ellipsis; with no boundary there either, it ends at the last
    sentence end before low, else at the last boundary, else inside its one word. Every sentence end
    up to `target` comes before any of these cuts, so text up to it can be streamed at once.

    A speech that would end inside a quotation (one of its own, or one its prompt opened) gets the closing
    quote after its last sentence or ellipsis, counted within `high`: the model often goes on quoting
    for longer than a speech lasts.
    """
    ends = [
        m.end()
        for m in _SENTENCE_END.finditer(text, 0, min(len(text), ending.high + 1))
        if m.end() + _closing_room(text[: m.end()], ending) <= ending.high
    ]
    certain = max((e for e in ends if e <= ending.target), default=0)
    after = next((e for e in ends if e > ending.target), None)
    if after is None and not exhausted and len(text) <= ending.high:
        if certain < ending.low or len(text) - ending.target < ending.target - certain:
            return certain, None
        # Any end still to come lies at least as far past the target as `certain` lies before it, and a
        # tie goes to the earlier end: `certain` is the ending, and generating on would be wasted.
        return certain, _closed(text[:certain], ending)
    candidates = [e for e in (certain if certain >= ending.low else None, after) if e is not None]
    if candidates:
        return certain, _closed(text[: min(candidates, key=lambda e: (abs(e - ending.target), e))], ending)
    return certain, _closed(_cut_at_word(text, ending, certain), ending)


def _closing_room(text: str, ending: Ending) -> int:
    """The characters that closing a quotation open at the end of `text` adds."""
    return len(closing_quote(text, ending.quoted))


def _closed(speech: str, ending: Ending) -> str:
    """The speech with the quotation it ends inside closed (settle left room for it, except in a window
    too small for both an ellipsis and a quote)."""
    closing = closing_quote(speech, ending.quoted)
    return speech + closing if len(speech) + len(closing) <= ending.limit else speech


def _cut_at_word(text: str, ending: Ending, certain: int) -> str:
    """The text up to the word boundary nearest the target (leaving room for the ellipsis and a closing
    quote), plus "…"."""
    boundaries = [
        m.start()
        for m in _WORD_BOUNDARY.finditer(text, 0, ending.high)
        if m.start() + len(ELLIPSIS) + _closing_room(text[: m.start()], ending) <= ending.high
    ]
    inside = [b for b in boundaries if ending.low <= b]
    if inside:
        cut = min(inside, key=lambda b: (abs(b - ending.target), b))
    elif certain:  # the window holds no word boundary: a short speech that ends well beats a short one that trails
        return text[:certain]
    elif boundaries:
        cut = boundaries[-1]
    else:  # one word longer than the whole window: nothing better than its first part
        cut = max(0, ending.high - len(ELLIPSIS) - _closing_room(text[: ending.high - 1], ending))
    return text[: max(len(text[:cut].rstrip(_DANGLING)), certain)] + ELLIPSIS
