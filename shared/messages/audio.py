"""Audio travelling up from the client. Sent as raw PCM behind a small JSON header (see codec)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.envelope import Envelope


class AudioIn(Envelope):
    """Gateway -> the conversation's VAD/STT worker: one client frame, PCM s16le mono 16 kHz.

    `received_ms` is the gateway's clock when the frame arrived; speech timings are measured on it."""

    type: Literal["audio.in"] = "audio.in"
    received_ms: float
    pcm: bytes = Field(default=b"", exclude=True, repr=False)


class AudioCommit(Envelope):
    """Gateway -> VAD/STT worker: the client sent `input_audio.commit`; end the utterance now."""

    type: Literal["audio.commit"] = "audio.commit"
    received_ms: float


class AudioClear(Envelope):
    """Gateway -> VAD/STT worker: drop the utterance under way and anything buffered, unanswered
    (the OpenAI Realtime `input_audio_buffer.clear`). Sent on the audio's own path, so it applies
    after every frame the client sent before it."""

    type: Literal["audio.clear"] = "audio.clear"
