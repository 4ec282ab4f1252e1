"""Audio travelling up from the client. Sent as raw PCM behind a small JSON header (see codec)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.envelope import Envelope

InputRate = Literal[16000, 24000]  # `/v1/ws` clients send 16 kHz; OpenAI Realtime clients 24 kHz


class AudioIn(Envelope):
    """Gateway -> the conversation's VAD/STT worker: one client frame, PCM s16le mono at
    `sample_rate`, as the client sent it.

    `received_ms` is the gateway's clock when the frame arrived; speech timings are measured on it.
    The worker, not the gateway, brings 24 kHz audio to whisper's 16 kHz: it segments the stream at
    the client's own rate (workers/vad_stt/segmenter.py), so no resampling filter delays the end of
    speech by its group delay."""

    type: Literal["audio.in"] = "audio.in"
    received_ms: float
    sample_rate: InputRate | None = None  # None: 16 kHz (left out of every /v1/ws frame's header)
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
