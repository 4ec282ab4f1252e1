"""Adaptive end of turn: how much silence ends an utterance depends on what was said so far.

A person who asked a whole question has finished; one who trails off on "and" or "um" has not. The
VAD/STT worker already transcribes a pause early (speculation, `STT_SPECULATE_AFTER_MS` into the
silence); when that transcript is ready, `completion` says how likely the turn is complete, and
`end_silence_ms` turns that into the silence that ends this utterance: down to
`VAD_END_SILENCE_MIN_MS` for a finished sentence or question, up to `VAD_END_SILENCE_MAX_MS` for
a clause left open, `VAD_END_SILENCE_MS` when the text says nothing either way.

`Completion` is the whole interface (text so far -> probability the turn is complete), so a
turn-detection model can replace the punctuation rule without touching the segmenter."""
from __future__ import annotations

import re
from typing import Protocol

# words a finished turn does not end on: conjunctions, articles, fillers
OPEN_ENDINGS = frozenset("and or but so because the a an um uh er erm hmm".split())
# words a turn seldom ends on unless it is a question ("Where are you from?"): whisper's full stop
# or question mark after them says the sentence is whole, their absence that it may go on
LEANING_ENDINGS = frozenset("""to of for with about from in on at by into than as if then that which who
    my your our their his her its like well also plus when while until""".split())
_WORD = re.compile(r"[a-z']+")


class Completion(Protocol):
    def __call__(self, text: str) -> float:
        """Probability (0..1) that the user's turn is complete, given its text so far."""


def punctuation_rule(text: str) -> float:
    """Whisper punctuates: a question mark or a full stop closes a turn, an open clause does not."""
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    if not words:
        return 0.5
    if words[-1] in OPEN_ENDINGS or stripped.endswith((",", "...", "…", "-", "—", ":")):
        return 0.1
    if stripped.endswith("?"):
        return 0.95
    if stripped.endswith((".", "!")):
        return 0.85
    if words[-1] in LEANING_ENDINGS:
        return 0.25
    return 0.5


def end_silence_ms(probability: float, base_ms: int, min_ms: int, max_ms: int) -> int:
    """The silence that ends the utterance: `base_ms` at 0.5, toward `min_ms` as the turn looks
    complete and toward `max_ms` as it looks open (linear in between)."""
    p = min(1.0, max(0.0, probability))
    if p >= 0.5:
        return round(base_ms - (base_ms - min_ms) * (p - 0.5) / 0.5)
    return round(base_ms + (max_ms - base_ms) * (0.5 - p) / 0.5)
