"""The OpenAI Realtime API's wire vocabulary (GA event names), for the `/v1/realtime` adapter:
parsing client events within limits, the session object, and turning a conversation's own events
into Realtime server events.

A voicepipe turn is one thing: what the user said (spoken or typed) and the reply to it, under one
`turn_id`. The Realtime API splits it into a user conversation item and a response that adds an
assistant item. `RealtimeTurns` keeps that mapping (turn -> user item, response, assistant item)
and produces, for each of the conversation's events, the Realtime events a client of the API
expects in the order it expects them; every event gets a fresh `event_id` and items and responses
keep stable ids. Nothing here does I/O or knows the bus: the adapter feeds events in and sends
what comes out, so every mapping is tested on its own against the `openai` SDK's own models.

Audio is PCM16 mono at 24 kHz in both directions on the wire, base64 in JSON; resampling to and
from the pipeline's rates is the adapter's (shared/resample.py)."""
from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.messages import bounded_json
from shared.messages.client import JsonLimits, excerpt

WIRE_RATE = 24000  # the only audio format offered: {"type": "audio/pcm", "rate": 24000}
AUDIO_FORMAT = {"type": "audio/pcm", "rate": WIRE_RATE}
DEFAULT_SILENCE_MS = 500  # server_vad's default silence_duration_ms


# ---- client events
class _ClientEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    event_id: str | None = Field(default=None, max_length=128)


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: dict[str, Any]


class InputAudioAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64 PCM16 24 kHz mono


class InputAudioCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    item: dict[str, Any]
    previous_item_id: str | None = None


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: dict[str, Any] | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


class ItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(default=0, ge=0)
    audio_end_ms: int = Field(ge=0)


ClientEvent = Annotated[
    Union[
        SessionUpdate, InputAudioAppend, InputAudioCommit, InputAudioClear, ItemCreate, ResponseCreate,
        ResponseCancel, ItemTruncate,
    ],
    Field(discriminator="type"),
]
_client_events: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
SUPPORTED = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "response.create", "response.cancel", "conversation.item.truncate",
)


class RealtimeError(Exception):
    """A client event that cannot be taken: answered with an `error` event; the socket stays."""

    def __init__(self, code: str, message: str, event_id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.event_id, self.param = code, message, event_id, param


def parse_client_event(text: str, limits: JsonLimits) -> ClientEvent:
    """One client text frame as a typed event; RealtimeError (quoting at most a short excerpt of the
    input) for anything else: not JSON within the limits, an unknown type, a field of the wrong type."""
    try:
        data = bounded_json.loads(text, max_depth=limits.max_depth, max_fields=limits.max_fields)
    except ValueError as exc:  # JsonLimitError and JSONDecodeError: neither quotes the input
        raise RealtimeError("invalid_event", f"invalid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise RealtimeError("invalid_event", "expected a JSON object with a string `type`")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    try:
        return _client_events.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        if first["type"] == "union_tag_invalid":
            raise RealtimeError(
                "unsupported_event", f"unsupported event type {excerpt(data['type'])}", event_id, "type"
            ) from None
        where = ".".join(str(p) for p in first["loc"][1:]) or None
        raise RealtimeError("invalid_event", f"{data['type']}: {where or 'event'}: {first['msg']}", event_id, where) from None


def decode_audio(event: InputAudioAppend) -> bytes:
    """The PCM16 of an append event; RealtimeError for bad base64 or a half sample."""
    try:
        pcm = base64.b64decode(event.audio, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("invalid_event", "input_audio_buffer.append: audio is not base64", event.event_id, "audio") from None
    if len(pcm) % 2:
        raise RealtimeError("invalid_event", "input_audio_buffer.append: audio is not whole 16-bit samples", event.event_id, "audio")
    return pcm


def user_text(event: ItemCreate) -> str:
    """The text of a `conversation.item.create` user message with `input_text` content (the only
    item kind taken); RealtimeError otherwise."""
    item = event.item
    if item.get("type") != "message" or item.get("role") != "user":
        raise RealtimeError("unsupported_item", "only user messages can be created", event.event_id, "item.role")
    parts = item.get("content")
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "input_text"] if isinstance(parts, list) else []
    if not texts or not all(isinstance(t, str) for t in texts) or not "".join(texts).strip():
        raise RealtimeError("unsupported_item", "a user message needs `input_text` content", event.event_id, "item.content")
    return " ".join(t.strip() for t in texts if t.strip())


# ---- the session
@dataclass
class Session:
    """What `session.update` may change, and the session object sent back."""

    session_id: str = field(default_factory=lambda: f"sess_{uuid.uuid4().hex[:24]}")
    model: str = "voicepipe"
    instructions: str | None = None
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    server_vad: bool = True
    silence_duration_ms: int = DEFAULT_SILENCE_MS

    def update(self, changes: dict[str, Any], event_id: str | None = None) -> None:
        """Apply a `session.update`; RealtimeError (nothing applied) for a value not supported."""
        staged = Session(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if "instructions" in changes:
            if changes["instructions"] is not None and not isinstance(changes["instructions"], str):
                raise RealtimeError("invalid_value", "instructions must be a string", event_id, "session.instructions")
            staged.instructions = changes["instructions"]
        if "output_modalities" in changes:
            modalities = changes["output_modalities"]
            if modalities not in (["audio"], ["text"]):
                raise RealtimeError("invalid_value", 'output_modalities must be ["audio"] or ["text"]', event_id, "session.output_modalities")
            staged.output_modalities = list(modalities)
        audio = changes.get("audio") or {}
        if not isinstance(audio, dict):
            raise RealtimeError("invalid_value", "audio must be an object", event_id, "session.audio")
        for direction in ("input", "output"):
            fmt = (audio.get(direction) or {}).get("format")
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm" or fmt.get("rate", WIRE_RATE) != WIRE_RATE):
                raise RealtimeError(
                    "unsupported_format", "only {type: audio/pcm, rate: 24000} audio is supported", event_id,
                    f"session.audio.{direction}.format",
                )
        turn_input = audio.get("input") or {}
        if "turn_detection" in turn_input:
            detection = turn_input["turn_detection"]
            if detection is None:
                staged.server_vad = False
            elif isinstance(detection, dict) and detection.get("type") == "server_vad":
                silence = detection.get("silence_duration_ms", DEFAULT_SILENCE_MS)
                if not isinstance(silence, int) or isinstance(silence, bool) or not 100 <= silence <= 5000:
                    raise RealtimeError(
                        "invalid_value", "silence_duration_ms must be an integer from 100 to 5000", event_id,
                        "session.audio.input.turn_detection.silence_duration_ms",
                    )
                staged.server_vad, staged.silence_duration_ms = True, silence
            else:
                raise RealtimeError(
                    "unsupported_turn_detection", "turn_detection must be server_vad or null", event_id,
                    "session.audio.input.turn_detection",
                )
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(staged, name))

    def to_wire(self) -> dict[str, Any]:
        detection = (
            {"type": "server_vad", "silence_duration_ms": self.silence_duration_ms, "create_response": True,
             "interrupt_response": True}
            if self.server_vad else None
        )
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": self.model,
            "instructions": self.instructions or "",
            "output_modalities": self.output_modalities,
            "audio": {
                "input": {"format": AUDIO_FORMAT, "turn_detection": detection, "transcription": {"model": "whisper"}},
                "output": {"format": AUDIO_FORMAT, "voice": "voicepipe"},
            },
        }


# ---- server events
Status = Literal["completed", "cancelled", "failed", "incomplete"]


@dataclass
class _Turn:
    """One voicepipe turn as Realtime sees it."""

    user_item: str
    response_id: str | None = None
    assistant_item: str | None = None
    transcript: str = ""
    audio_sent: bool = False
    spoken: bool = False  # the user item holds audio (else typed text)
    closed: bool = False  # its `response.done` was produced


class RealtimeTurns:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._turns: dict[str, _Turn] = {}
        self._last_item: str | None = None
        self.conversation_id = f"conv_{uuid.uuid4().hex[:24]}"

    # ids
    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "event_id": f"event_{uuid.uuid4().hex[:20]}", **fields}

    @staticmethod
    def new_item_id() -> str:
        return f"item_{uuid.uuid4().hex[:24]}"

    def _turn(self, turn_id: str) -> _Turn:
        turn = self._turns.get(turn_id)
        if turn is None:
            turn = self._turns[turn_id] = _Turn(self.new_item_id())
            while len(self._turns) > 64:  # the oldest turns are long finished
                self._turns.pop(next(iter(self._turns)))
        return turn

    def closed(self, turn_id: str) -> bool:
        """Whether the turn's `response.done` was produced (nothing more of it goes out)."""
        turn = self._turns.get(turn_id)
        return turn is not None and turn.closed

    def rekey(self, key: str, turn_id: str) -> None:
        """What was kept under `key` (a typed message, before the turn that answers it had an id)
        belongs to `turn_id` from now on."""
        turn = self._turns.pop(key, None)
        if turn is not None:
            self._turns[turn_id] = turn

    def find_item(self, item_id: str) -> str | None:
        """The turn whose assistant item this is (for `conversation.item.truncate`)."""
        for turn_id, turn in self._turns.items():
            if turn.assistant_item == item_id:
                return turn_id
        return None

    def response_of(self, turn_id: str) -> str | None:
        turn = self._turns.get(turn_id)
        return turn.response_id if turn else None

    @property
    def _audio(self) -> bool:
        return self.session.output_modalities == ["audio"]

    # session
    def session_created(self) -> dict[str, Any]:
        return self._event("session.created", session=self.session.to_wire())

    def session_updated(self) -> dict[str, Any]:
        return self._event("session.updated", session=self.session.to_wire())

    def error(self, code: str, message: str, event_id: str | None = None, param: str | None = None,
              kind: str = "invalid_request_error") -> dict[str, Any]:
        return self._event("error", error={"type": kind, "code": code, "message": message, "param": param, "event_id": event_id})

    # the user's side
    def speech_started(self, turn_id: str, audio_start_ms: int) -> list[dict[str, Any]]:
        turn = self._turn(turn_id)
        turn.spoken = True
        return [self._event("input_audio_buffer.speech_started", audio_start_ms=max(0, audio_start_ms), item_id=turn.user_item)]

    def speech_stopped(self, turn_id: str, audio_end_ms: int) -> list[dict[str, Any]]:
        turn = self._turn(turn_id)
        turn.spoken = True
        previous, self._last_item = self._last_item, turn.user_item
        item = self._user_item(turn, status="completed", transcript=None)
        return [
            self._event("input_audio_buffer.speech_stopped", audio_end_ms=max(0, audio_end_ms), item_id=turn.user_item),
            self._event("input_audio_buffer.committed", item_id=turn.user_item, previous_item_id=previous),
            self._event("conversation.item.added", item=item, previous_item_id=previous),
        ]

    def transcribed(self, turn_id: str, text: str, seconds: float) -> list[dict[str, Any]]:
        turn = self._turn(turn_id)
        return [
            self._event(
                "conversation.item.input_audio_transcription.completed", item_id=turn.user_item, content_index=0,
                transcript=text, usage={"type": "duration", "seconds": round(max(0.0, seconds), 3)},
            ),
            self._event("conversation.item.done", item=self._user_item(turn, status="completed", transcript=text)),
        ]

    def typed(self, turn_id: str, text: str, item_id: str | None = None) -> list[dict[str, Any]]:
        """A user message created by `conversation.item.create`: added and done at once."""
        turn = self._turn(turn_id)
        if item_id:
            turn.user_item = item_id
        previous, self._last_item = self._last_item, turn.user_item
        item = {"id": turn.user_item, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_text", "text": text}]}
        return [
            self._event("conversation.item.added", item=item, previous_item_id=previous),
            self._event("conversation.item.done", item=item, previous_item_id=previous),
        ]

    def _user_item(self, turn: _Turn, status: str, transcript: str | None) -> dict[str, Any]:
        return {"id": turn.user_item, "object": "realtime.item", "type": "message", "role": "user", "status": status,
                "content": [{"type": "input_audio", "transcript": transcript}]}

    # the reply
    def response_started(self, turn_id: str) -> list[dict[str, Any]]:
        """Once per turn, before its first text or audio."""
        turn = self._turn(turn_id)
        if turn.response_id is not None:
            return []
        turn.response_id = f"resp_{uuid.uuid4().hex[:24]}"
        turn.assistant_item = self.new_item_id()
        previous, self._last_item = self._last_item, turn.assistant_item
        item = self._assistant_item(turn, "in_progress", content=[])
        return [
            self._event("response.created", response=self._response(turn, "in_progress", [])),
            self._event("response.output_item.added", response_id=turn.response_id, output_index=0, item=item),
            self._event("conversation.item.added", item=item, previous_item_id=previous),
            self._event(
                "response.content_part.added", response_id=turn.response_id, item_id=turn.assistant_item,
                output_index=0, content_index=0, part=self._part(turn),
            ),
        ]

    def text_delta(self, turn_id: str, delta: str) -> list[dict[str, Any]]:
        out = self.response_started(turn_id)
        turn = self._turns[turn_id]
        turn.transcript += delta
        kind = "response.output_audio_transcript.delta" if self._audio else "response.output_text.delta"
        out.append(self._event(kind, **self._where(turn), delta=delta))
        return out

    def audio_delta(self, turn_id: str, pcm24k: bytes) -> list[dict[str, Any]]:
        if not self._audio or not pcm24k:
            return []
        out = self.response_started(turn_id)
        turn = self._turns[turn_id]
        turn.audio_sent = True
        out.append(self._event("response.output_audio.delta", **self._where(turn), delta=base64.b64encode(pcm24k).decode()))
        return out

    def response_done(
        self, turn_id: str, status: Status = "completed", reason: str | None = None, text: str | None = None,
        error: dict[str, str] | None = None, timings: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Close the turn's response (once): the content part, the item, then `response.done`.
        `timings` (voicepipe's `metrics` and `diagnostics` of the turn, docs/protocol.md §1.1) ride
        on the response as `voicepipe`, a field the API does not define and its SDKs keep."""
        if self.closed(turn_id):
            return []
        out = self.response_started(turn_id)
        turn = self._turns[turn_id]
        turn.closed = True
        if text is not None and status == "completed":
            turn.transcript = text
        where = self._where(turn)
        if self._audio:
            out.append(self._event("response.output_audio.done", **where))
            out.append(self._event("response.output_audio_transcript.done", **where, transcript=turn.transcript))
        else:
            out.append(self._event("response.output_text.done", **where, text=turn.transcript))
        out.append(self._event(
            "response.content_part.done", response_id=turn.response_id, item_id=turn.assistant_item, output_index=0,
            content_index=0, part=self._part(turn),
        ))
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._assistant_item(turn, item_status, content=[self._part(turn, item=True)])
        out.append(self._event("response.output_item.done", response_id=turn.response_id, output_index=0, item=item))
        out.append(self._event("conversation.item.done", item=item))
        details: dict[str, Any] | None = None
        if status != "completed":
            details = {"type": status}
            if reason is not None:
                details["reason"] = reason
            if error is not None:
                details["error"] = error
        response = self._response(turn, status, [item], details)
        if timings:
            response["voicepipe"] = timings
        out.append(self._event("response.done", response=response))
        return out

    def truncated(self, item_id: str, audio_end_ms: int) -> dict[str, Any]:
        return self._event("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)

    def cleared(self) -> dict[str, Any]:
        return self._event("input_audio_buffer.cleared")

    # shapes
    def _where(self, turn: _Turn) -> dict[str, Any]:
        return {"response_id": turn.response_id, "item_id": turn.assistant_item, "output_index": 0, "content_index": 0}

    def _part(self, turn: _Turn, item: bool = False) -> dict[str, Any]:
        if self._audio:
            return {"type": "output_audio" if item else "audio", "transcript": turn.transcript}
        return {"type": "output_text" if item else "text", "text": turn.transcript}

    def _assistant_item(self, turn: _Turn, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": turn.assistant_item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def _response(self, turn: _Turn, status: str, output: list[dict[str, Any]], details: dict[str, Any] | None = None) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": turn.response_id, "object": "realtime.response", "status": status, "output": output,
            "conversation_id": self.conversation_id, "output_modalities": self.session.output_modalities,
            "audio": {"output": {"format": AUDIO_FORMAT, "voice": "voicepipe"}},
        }
        if details is not None:
            response["status_details"] = details
        return response
