"""The output guard: a blocked term in the LLM's reply never reaches the client or text-to-speech.

It sits in the LLM orchestrator between the streamed reply (text deltas, i.e. tokens) and everything
downstream. A term can arrive split over several deltas ("fo" + "rbidden"), and a word at the end of
the text so far may still go on ("bomb" + "astic"), so the guard holds back the tail that could still
become a blocked term and releases everything before it at once: ordinary text passes through delta
by delta, and with no terms configured the guard is a pure pass-through.

The decision is a `GuardCheck`, a function from the text so far to a `Verdict`, so that a moderation
model or service can later replace the term list (`term_check`, from `GUARD_BLOCKED_TERMS`)."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BLOCKED_REASON = "the reply contained a blocked term"  # shown to clients: never quote the term itself


@dataclass(frozen=True)
class Verdict:
    blocked: bool = False
    reason: str = ""
    # When allowed: text from this index on is undecided and held back; None: all of it may go.
    hold_from: int | None = None


GuardCheck = Callable[[str, bool], Verdict]  # (all text so far, final: the stream has ended) -> verdict


class Blocked(Exception):
    """The reply was stopped; `reason` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def term_check(terms: Sequence[str]) -> GuardCheck | None:
    """A check that blocks any of `terms` (words or phrases, case-insensitive, on word boundaries); None when there are no terms."""
    normalized = sorted({" ".join(term.lower().split()) for term in terms} - {""})
    return _TermCheck(normalized) if normalized else None


def _whole(term: str) -> str:
    """The term's pattern: characters literal, each inner space matching any run of whitespace."""
    return r"\s+".join(re.escape(word) for word in term.split(" "))


def _beginning(term: str) -> str:
    """Matches any non-empty beginning of the term, e.g. "b(?:o(?:m(?:b)?)?)?"."""
    pieces = [r"\s+" if char == " " else re.escape(char) for char in term]
    pattern = ""
    for piece in reversed(pieces[1:]):
        pattern = f"(?:{piece}{pattern})?"
    return pieces[0] + pattern


class _TermCheck:
    """Blocks a complete term; holds back from the earliest word start whose rest could still become one.

    A term counts only where no word character touches it on either side. These are lookarounds, not
    \\b, so that terms with non-word characters at their ends ("c++", "f*ck") behave the same way."""

    def __init__(self, terms: list[str]) -> None:
        whole = "|".join(_whole(term) for term in terms)
        begun = "|".join(_beginning(term) for term in terms)
        # While streaming, a term is decided only once a character follows it (it may still go on: "bomb|astic").
        self._decided = re.compile(rf"(?<!\w)(?:{whole})(?=\W)", re.IGNORECASE)
        self._final = re.compile(rf"(?<!\w)(?:{whole})(?!\w)", re.IGNORECASE)
        self._open = re.compile(rf"(?<!\w)(?:{begun})\Z", re.IGNORECASE)
        # The last text allowed while streaming, and an index before which no term can start in any text that
        # extends it, so the next call of the same stream only searches from there. Guards share a check: when
        # their calls interleave, the text does not extend the last one and the search starts at 0 (correct, slower).
        self._last: tuple[str, int] = ("", 0)

    def __call__(self, text: str, final: bool) -> Verdict:
        last, start = self._last
        if not text.startswith(last):
            start = 0
        if (self._final if final else self._decided).search(text, start):  # lookbehind still sees text[start - 1]
            return Verdict(blocked=True, reason=BLOCKED_REASON)
        if final:
            return Verdict()
        tail = self._open.search(text, start)
        hold_from = tail.start() if tail else None
        self._last = (text, len(text) if hold_from is None else hold_from)
        return Verdict(hold_from=hold_from)


class OutputGuard:
    """Holds back one streamed reply's text until `check` has decided it; None: a pure pass-through."""

    def __init__(self, check: GuardCheck | None) -> None:
        self._check = check
        self._text = ""
        self._released = 0  # self._text[:self._released] has left the guard
        self._blocked: str | None = None  # the reason, once blocked; the guard then stays blocked

    @property
    def released(self) -> str:
        """All text released so far."""
        return self._text[: self._released]

    def feed(self, delta: str) -> str:
        """Add one streamed delta; returns the text that may now be released (possibly ""). Raises Blocked."""
        return self._advance(delta, final=False)

    def finish(self) -> str:
        """The stream ended: returns the held rest, or raises Blocked."""
        return self._advance("", final=True)

    def _advance(self, delta: str, final: bool) -> str:
        if self._blocked is not None:
            raise Blocked(self._blocked)
        self._text += delta
        end = len(self._text)
        if self._check is not None:
            verdict = self._check(self._text, final)
            if verdict.blocked:
                self._blocked = verdict.reason or BLOCKED_REASON
                raise Blocked(self._blocked)
            if verdict.hold_from is not None and not final:
                end = max(self._released, min(verdict.hold_from, end))  # released text cannot be taken back
        out, self._released = self._text[self._released : end], end
        return out
