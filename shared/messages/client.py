"""The client WebSocket protocol (docs/protocol.md §1): what a client may send, and server event frames."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


class BadClientMessage(ValueError):
    pass


def parse_client_message(text: str) -> ClientMessage:
    """Parse one client text frame; raises BadClientMessage with a readable reason."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadClientMessage(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadClientMessage("invalid JSON: nested too deeply") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadClientMessage("expected a JSON object with a string 'type'")
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "union_tag_invalid":
            raise BadClientMessage(f"unknown message type {data['type']!r}") from exc
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise BadClientMessage(f"{data['type']}: {where}: {first['msg']}") from exc


def server_event(type_: str, turn_id: str | None = None, **fields: Any) -> str:
    """One server -> client JSON event; `turn_id` is included wherever a turn exists."""
    event: dict[str, Any] = {"type": type_}
    if turn_id is not None:
        event["turn_id"] = turn_id
    event.update(fields)
    return json.dumps(event)
