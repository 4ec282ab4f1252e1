"""The client WebSocket protocol (docs/protocol.md §1): what a client may send, and server event frames.

Client text is untrusted: it is parsed within limits (shared/messages/bounded_json.py), and an
error message quotes at most `EXCERPT_CHARS` of it, so a 60 KiB `type` is never echoed back whole."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.messages import bounded_json

INPUT_AUDIO = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputAudioCommit(_ClientMessage):
    type: Literal["input_audio.commit"]


class TextInputRequest(_ClientMessage):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)  # blank text is no turn

    type: Literal["text.input"]
    text: Annotated[str, Field(min_length=1, max_length=8000)]


class ResponseCancelRequest(_ClientMessage):
    type: Literal["response.cancel"]


class Ping(_ClientMessage):
    type: Literal["ping"]


ClientMessage = Annotated[
    Union[InputAudioCommit, TextInputRequest, ResponseCancelRequest, Ping], Field(discriminator="type")
]
_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


EXCERPT_CHARS = 40  # most characters of client input an error message quotes


class BadClientMessage(ValueError):
    pass


@dataclass(frozen=True)
class JsonLimits:
    """Limits on one client text frame (settings `MAX_JSON_DEPTH`, `MAX_JSON_FIELDS`; the
    defaults here are the settings' defaults, for callers without settings)."""

    max_depth: int = 16
    max_fields: int = 64

    @classmethod
    def from_settings(cls, settings: Any) -> "JsonLimits":
        return cls(settings.max_json_depth, settings.max_json_fields)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def parse_client_message(text: str, limits: JsonLimits = JsonLimits()) -> ClientMessage:
    """Parse one client text frame; raises BadClientMessage with a short, readable reason."""
    try:
        data = bounded_json.loads(text, max_depth=limits.max_depth, max_fields=limits.max_fields)
    except bounded_json.JsonLimitError as exc:
        raise BadClientMessage(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:  # cannot happen within the limits; kept as a last line of defence
        raise BadClientMessage("invalid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError: its text names a position, never the input
        raise BadClientMessage(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadClientMessage("expected a JSON object with a string 'type'")
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        if first["type"] == "union_tag_invalid":
            raise BadClientMessage(f"unknown message type {excerpt(data['type'])}") from exc
        # the tag matched, so `type` is one of ours; `loc` names our fields, `msg` never quotes input
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise BadClientMessage(f"{data['type']}: {where}: {first['msg']}") from exc


def server_event(type_: str, turn_id: str | None = None, **fields: Any) -> str:
    """One server -> client JSON event; `turn_id` is included wherever a turn exists."""
    event: dict[str, Any] = {"type": type_}
    if turn_id is not None:
        event["turn_id"] = turn_id
    event.update(fields)
    return json.dumps(event)
