"""Wire format of bus messages.

A message without audio is its JSON. A message with audio (`pcm`) is
`0x00 | u32 big-endian header length | JSON header | raw PCM`, so audio is never base64'd."""
from __future__ import annotations

import json

from shared.messages import BusMessage, bus_message_adapter

_BINARY = b"\x00"


class DecodeError(ValueError):
    pass


def encode(message: BusMessage) -> bytes:
    header = message.model_dump_json(exclude_none=True).encode()
    pcm = getattr(message, "pcm", None)
    if pcm is None:
        return header
    return _BINARY + len(header).to_bytes(4, "big") + header + pcm


def decode(data: bytes | str) -> BusMessage:
    try:
        if isinstance(data, str):
            data = data.encode()
        if data[:1] == _BINARY:
            size = int.from_bytes(data[1:5], "big")
            fields = json.loads(data[5 : 5 + size])
            fields["pcm"] = data[5 + size :]
            return bus_message_adapter.validate_python(fields)
        return bus_message_adapter.validate_json(data)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"undecodable bus message: {exc}") from exc
