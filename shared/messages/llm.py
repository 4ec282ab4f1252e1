"""What the LLM orchestrator produces, and how a response is cancelled."""
from __future__ import annotations

from typing import Literal

from shared.messages.envelope import Envelope


class ResponseTextDelta(Envelope):
    """Orchestrator -> gateway: a piece of streamed assistant text."""

    type: Literal["response.text.delta"] = "response.text.delta"
    delta: str


class ResponseTextDone(Envelope):
    """Orchestrator -> gateway: the text of the turn is complete.

    `sentences` tells how many pieces went to TTS; with 0 no audio follows. Durations in ms:
    `llm_ms` request to last token, `first_sentence_ms` request to the first piece handed to TTS."""

    type: Literal["response.text.done"] = "response.text.done"
    text: str
    sentences: int
    llm_ms: float | None = None
    first_sentence_ms: float | None = None


class ResponseCancel(Envelope):
    """Gateway -> orchestrator: stop the current response (client `response.cancel`)."""

    type: Literal["response.cancel"] = "response.cancel"
