"""What the VAD/STT worker hears, and typed user turns."""
from __future__ import annotations

from typing import Literal

from shared.messages.envelope import Envelope


class SpeechStarted(Envelope):
    """VAD/STT -> gateway: the user started speaking (opens a turn; `turn_id` is new)."""

    type: Literal["speech.started"] = "speech.started"


class SpeechSustained(Envelope):
    """VAD/STT -> gateway: the utterance has `BARGE_IN_MIN_SPEECH_MS` of voiced speech since its onset
    (sent once per utterance, only while barge-in is on). The gateway interrupts a reply that was
    already generating or playing when the speech began (`onset_ms`: gateway receive time of its
    first voiced frame); a click or a cough never gets this far."""

    type: Literal["speech.sustained"] = "speech.sustained"
    onset_ms: float = 0.0


class SpeechStopped(Envelope):
    """VAD/STT -> gateway: the utterance ended. A `TranscriptFinal` for the same turn follows.

    `speech_end_ms`: gateway receive time of the last voiced frame; `decided_ms`: receive time of
    the frame that completed the end-of-speech silence (or of the commit)."""

    type: Literal["speech.stopped"] = "speech.stopped"
    speech_end_ms: float
    decided_ms: float


class TranscriptPartial(Envelope):
    """VAD/STT -> gateway: interim transcript while the user speaks (setting `STT_PARTIALS`)."""

    type: Literal["transcript.partial"] = "transcript.partial"
    text: str


class TranscriptFinal(Envelope):
    """VAD/STT -> gateway and -> the conversation's orchestrator: the user turn's text.

    An empty text ends the turn at the gateway; the orchestrator only gets non-empty ones.
    `stt_ms`: whisper compute time; `stt_wait_ms`: how long the worker took from the end-of-speech
    decision to the transcript (smaller than `stt_ms` when transcription started early)."""

    type: Literal["transcript.final"] = "transcript.final"
    text: str
    stt_ms: float
    stt_wait_ms: float | None = None


class TranscriptEarly(Envelope):
    """VAD/STT -> the conversation's orchestrator: the transcript of a pause in the utterance
    `turn_id`, before the end of the turn is decided. The orchestrator may start a speculative
    reply on it (setting `SPECULATIVE_REPLY`): nothing of that reply reaches the client or the
    history unless the turn's `TranscriptFinal` brings the same text. `TranscriptWithdrawn` follows
    when the user goes on speaking, or when the turn ends without a final transcript for the
    orchestrator; at most one early transcript of a conversation stands at a time."""

    type: Literal["transcript.early"] = "transcript.early"
    text: str


class TranscriptWithdrawn(Envelope):
    """VAD/STT -> orchestrator: the early transcript of `turn_id` no longer stands (the user went
    on speaking, or the turn ended empty): a speculative reply on it is discarded without a trace."""

    type: Literal["transcript.withdrawn"] = "transcript.withdrawn"


class TextInput(Envelope):
    """Gateway -> orchestrator: a user turn typed instead of spoken."""

    type: Literal["text.input"] = "text.input"
    text: str
