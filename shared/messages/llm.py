"""What the LLM orchestrator produces, and how a response is cancelled."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.envelope import Envelope


class ResponseTextDelta(Envelope):
    """Orchestrator -> gateway: a piece of streamed assistant text."""

    type: Literal["response.text.delta"] = "response.text.delta"
    delta: str


class ResponseTextDone(Envelope):
    """Orchestrator -> gateway: the text of the turn is complete.

    `sentences` tells how many pieces went to TTS; with 0 no audio follows. Durations in ms:
    `llm_ms` request to last token, `first_sentence_ms` request to the first piece handed to TTS.
    `speculative`: the reply was started on the early transcript, before the turn was confirmed
    (its timings then count from that start)."""

    type: Literal["response.text.done"] = "response.text.done"
    text: str
    sentences: int
    llm_ms: float | None = None
    first_sentence_ms: float | None = None
    speculative: bool = False


# truncated: the client said how much of a reply it played (Realtime `conversation.item.truncate`);
# for a reply already complete, only its text in the history is cut
InterruptReason = Literal["barge_in", "cancelled", "truncated"]


class ResponseCancel(Envelope):
    """Gateway -> orchestrator: stop the reply of `turn_id` (barge-in or the client's `response.cancel`).

    The client was already told (`response.interrupted`). The orchestrator acts only when `turn_id`
    is its current or a waiting turn, so a late cancel never stops a newer reply. `heard` is how many
    of the turn's TTS pieces the client was sent audio of (2.5: two whole pieces and half the third);
    the history keeps only that text of the reply."""

    type: Literal["response.cancel"] = "response.cancel"
    reason: InterruptReason = "cancelled"
    heard: float = Field(default=0.0, ge=0)


class ResponseBlocked(Envelope):
    """Orchestrator -> gateway: the output guard blocked this turn's reply. The upstream stream is
    already closed and TTS told to stop; `ResponseTextDone` (with what was released) follows."""

    type: Literal["response.blocked"] = "response.blocked"
    reason: str
