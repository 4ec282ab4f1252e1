"""Wire format of bus messages, and the one place bus bytes become typed messages.

A message without audio is its JSON. A message with audio (`pcm`) is
`0x00 | u32 big-endian header length | JSON header | raw PCM`, so audio is never base64'd.

The bus is a trust boundary like the client socket: anything with access to Redis can publish on
any channel, and a bug in one process must not take down the others. So `decode` raises nothing
but `DecodeError`, whatever the bytes (deep nesting, a length prefix that overruns the data,
non-UTF-8, wrong field types, NaN, odd-length PCM), and its message is short and never quotes the
payload: it goes to logs, and payloads carry transcripts and audio."""
from __future__ import annotations

import json

from pydantic import ValidationError

from shared.messages import BusMessage, bus_message_adapter

_BINARY = b"\x00"
_HEADER = 5  # the marker byte and the u32 length
_MAX_ERRORS_NAMED = 3  # of a validation error, the first few field locations are named


class DecodeError(ValueError):
    pass


def encode(message: BusMessage) -> bytes:
    header = message.model_dump_json(exclude_none=True).encode()
    pcm = getattr(message, "pcm", None)
    if pcm is None:
        return header
    return _BINARY + len(header).to_bytes(4, "big") + header + pcm


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number the bus carries")


def _decode(data: bytes) -> BusMessage:
    if data[:1] != _BINARY:
        message = bus_message_adapter.validate_json(data)
        if getattr(message, "pcm", b""):  # audio only travels in the binary form
            raise DecodeError("audio in a JSON message")
        return message
    if len(data) < _HEADER:
        raise DecodeError("binary message shorter than its length prefix")
    size = int.from_bytes(data[1:_HEADER], "big")
    if size > len(data) - _HEADER:
        raise DecodeError(f"header length {size} overruns the {len(data)}-byte message")
    fields = json.loads(data[_HEADER : _HEADER + size], parse_constant=_no_constants)
    if not isinstance(fields, dict):
        raise DecodeError("binary message header is not a JSON object")
    pcm = data[_HEADER + size :]
    if len(pcm) % 2:
        raise DecodeError(f"audio of {len(pcm)} bytes is not whole 16-bit samples")
    fields["pcm"] = pcm
    message = bus_message_adapter.validate_python(fields)
    if not hasattr(message, "pcm"):
        raise DecodeError(f"audio attached to a {message.type} message")
    return message


def _brief(exc: ValidationError) -> str:
    """Where validation failed and why, without the offending values (they may be personal data)."""
    parts = [
        f"{'.'.join(str(p) for p in error['loc']) or 'message'}: {error['type']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)[:_MAX_ERRORS_NAMED]
    ]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode(data: bytes | str) -> BusMessage:
    """The typed message in `data`; raises DecodeError (only) for anything else."""
    try:
        return _decode(data.encode() if isinstance(data, str) else data)
    except DecodeError:
        raise
    except ValidationError as exc:
        raise DecodeError(f"invalid bus message: {_brief(exc)}") from None
    except RecursionError:  # the json module's recursion guard: nesting far too deep
        raise DecodeError("invalid bus message: nested too deeply") from None
    except UnicodeError:
        raise DecodeError("invalid bus message: not UTF-8") from None
    except (ValueError, TypeError, MemoryError) as exc:
        # a JSON syntax error names a position only; anything else is named by its type
        detail = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise DecodeError(f"invalid bus message: {detail}") from None
