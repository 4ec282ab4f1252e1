"""Speech synthesis: requests to TTS and the audio it sends back."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.envelope import Envelope


class TtsSpeak(Envelope):
    """Orchestrator -> the conversation's TTS worker: speak this piece of the reply (in `seq` order).

    A speculative reply (one started before the user's turn was confirmed) is spoken under a
    `turn_id` of its own, with `reply_to` naming the user's turn, whose audio it is sent as. While
    the turn is not confirmed its pieces come `held`: their audio stays in the TTS worker (only the
    first piece is rendered) until `TtsRelease`. A `TtsStop` of its own `turn_id` discards it."""

    type: Literal["tts.speak"] = "tts.speak"
    text: str
    seq: int
    reply_to: str | None = None  # the user's turn, when TTS knows the reply by another id
    held: bool = False


class TtsRelease(Envelope):
    """Orchestrator -> TTS (on the TTS inbox, after the speculative reply's pieces): the user's turn
    is confirmed; send the held audio of speculative reply `turn_id` now, and the rest as it comes."""

    type: Literal["tts.release"] = "tts.release"


class TtsEnd(Envelope):
    """Orchestrator -> TTS: no more pieces for this turn; TTS answers `TtsAudioDone` once all are spoken."""

    type: Literal["tts.end"] = "tts.end"
    sentences: int


class TtsStop(Envelope):
    """Orchestrator -> every TTS worker on the TTS control channel: drop speech of the conversation.

    With `turn_id`: that turn only (queued pieces dropped, synthesis under way stopped). Without it:
    everything the worker holds for socket `connection_id` (the orchestrator's end of a conversation);
    a worker already serving a newer socket of the conversation ignores it."""

    type: Literal["tts.stop"] = "tts.stop"
    connection_id: str | None = None


class TtsAudioStarted(Envelope):
    """TTS -> gateway: audio for the turn follows at this sample rate."""

    type: Literal["tts.audio.started"] = "tts.audio.started"
    sample_rate: int
    held_ms: float | None = None  # a speculative reply: how long its first audio waited for the turn's confirmation


class TtsAudio(Envelope):
    """TTS -> gateway: a chunk of reply audio, PCM s16le mono, sent as raw bytes behind a header."""

    type: Literal["tts.audio"] = "tts.audio"
    seq: int
    piece: int = 0  # the `TtsSpeak.seq` this audio speaks
    piece_end: float = 1.0  # share of that piece's audio sent once this chunk is (0 < piece_end <= 1)
    pcm: bytes = Field(default=b"", exclude=True, repr=False)


class TtsAudioDone(Envelope):
    """TTS -> gateway: every piece of the turn is spoken. `tts_ms` is total synthesis time,
    `first_chunk_ms` the synthesis time of the first piece."""

    type: Literal["tts.audio.done"] = "tts.audio.done"
    tts_ms: float | None = None
    first_chunk_ms: float | None = None
