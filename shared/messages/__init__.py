"""Typed bus messages, one module per family. `BusMessage` is the union parsed at every boundary."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from shared.messages.audio import AudioClear, AudioCommit, AudioIn
from shared.messages.control import (
    ConnectionDisconnected,
    ConversationConfigured,
    ConversationOpened,
    IntrospectReply,
    IntrospectRequest,
    SessionTakeover,
    StageError,
)
from shared.messages.envelope import Envelope
from shared.messages.llm import (
    ResponseBlocked,
    ResponseCancel,
    ResponseTextDelta,
    ResponseTextDone,
)
from shared.messages.requests import (
    RequestCancel,
    SpeechAudio,
    SpeechDone,
    SpeechRequest,
    TranscriptionRequest,
    TranscriptionResult,
)
from shared.messages.transcript import (
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    TextInput,
    TranscriptEarly,
    TranscriptFinal,
    TranscriptPartial,
    TranscriptWithdrawn,
)
from shared.messages.tts import (
    TtsAudio,
    TtsAudioDone,
    TtsAudioStarted,
    TtsEnd,
    TtsRelease,
    TtsSpeak,
    TtsStop,
)

BusMessage = Annotated[
    Union[
        AudioIn, AudioCommit, AudioClear, ConversationConfigured,
        SpeechStarted, SpeechSustained, SpeechStopped, TranscriptPartial, TranscriptEarly, TranscriptWithdrawn, TranscriptFinal, TextInput,
        ResponseTextDelta, ResponseTextDone, ResponseCancel, ResponseBlocked,
        TtsSpeak, TtsRelease, TtsEnd, TtsStop, TtsAudioStarted, TtsAudio, TtsAudioDone,
        ConversationOpened, ConnectionDisconnected, StageError, IntrospectRequest, IntrospectReply, SessionTakeover,
        TranscriptionRequest, TranscriptionResult, SpeechRequest, SpeechAudio, SpeechDone, RequestCancel,
    ],
    Field(discriminator="type"),
]
bus_message_adapter: TypeAdapter[BusMessage] = TypeAdapter(BusMessage)

__all__ = [
    "AudioClear", "AudioCommit", "AudioIn", "ConversationConfigured", "RequestCancel", "SpeechAudio", "SpeechDone", "SpeechRequest",
    "TranscriptionRequest", "TranscriptionResult", "BusMessage", "ConnectionDisconnected", "ConversationOpened", "Envelope", "IntrospectReply", "IntrospectRequest", "ResponseBlocked", "ResponseCancel", "SessionTakeover",
    "ResponseTextDelta", "ResponseTextDone", "SpeechStarted", "SpeechStopped", "SpeechSustained", "StageError", "TextInput",
    "TranscriptEarly", "TranscriptFinal", "TranscriptPartial", "TranscriptWithdrawn", "TtsAudio", "TtsAudioDone", "TtsAudioStarted", "TtsEnd",
    "TtsRelease", "TtsSpeak", "TtsStop", "bus_message_adapter",
]
