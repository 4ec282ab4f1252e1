"""One-shot requests: a transcription or a speech synthesis asked over HTTP (docs/protocol.md §6),
served by the same stage workers as conversations, over the same bus.

A request is not a conversation: no socket, no lease, no history. Its id travels in the
envelope's `conversation_id` (prefixed `req-`, so a log line tells the two apart), the worker is
chosen by the gateway like a conversation's, and answers go to the asking gateway's inbox
(`gateway`). The gateway withdraws a request whose HTTP client went away with `RequestCancel`.
Audio travels as raw PCM behind the header, like all bus audio (see codec)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.envelope import Envelope

REQUEST_PREFIX = "req-"


class TranscriptionRequest(Envelope):
    """Gateway -> one VAD/STT worker: transcribe this audio (PCM s16le mono 16 kHz), all of it."""

    type: Literal["transcription.request"] = "transcription.request"
    gateway: str
    pcm: bytes = Field(default=b"", exclude=True, repr=False)


class TranscriptionResult(Envelope):
    """VAD/STT worker -> gateway: the text, or an error (`code`, `message`) and no text."""

    type: Literal["transcription.result"] = "transcription.result"
    text: str = ""
    duration_s: float = 0.0
    stt_ms: float | None = None
    code: str | None = None
    message: str | None = None


class SpeechRequest(Envelope):
    """Gateway -> one TTS worker: speak this text; the audio comes back piece by piece."""

    type: Literal["speech.request"] = "speech.request"
    gateway: str
    text: str


class SpeechAudio(Envelope):
    """TTS worker -> gateway: the next chunk of a speech request's audio (PCM s16le mono)."""

    type: Literal["speech.audio"] = "speech.audio"
    seq: int
    sample_rate: int
    pcm: bytes = Field(default=b"", exclude=True, repr=False)


class SpeechDone(Envelope):
    """TTS worker -> gateway: the request is spoken (`chunks` sent), or failed (`code`, `message`)."""

    type: Literal["speech.done"] = "speech.done"
    chunks: int = 0
    tts_ms: float | None = None
    code: str | None = None
    message: str | None = None


class RequestCancel(Envelope):
    """Gateway -> the serving worker: the HTTP client went away; drop the request."""

    type: Literal["request.cancel"] = "request.cancel"


RequestReply = TranscriptionResult | SpeechAudio | SpeechDone
