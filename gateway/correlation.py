"""The correlation id of a request (docs/protocol.md §1, §3): the caller's `X-Correlation-ID` if
it is 1 to 128 characters of `[A-Za-z0-9._:-]`, else a new UUID4.

The id is copied into every log line and bus message of the conversation, in every process, so a
caller's value is only taken when it cannot forge a log line (no spaces, quotes or newlines), cannot
bloat every message, and decodes as ASCII: the header arrives as raw bytes, and decoding arbitrary
bytes as UTF-8 was a 500 waiting for a client to send a byte over 0x7f."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

HEADER = b"x-correlation-id"
_VALID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def correlation_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The caller's id from raw ASGI headers if valid, else a new UUID4."""
    for name, value in headers:
        if name == HEADER:
            if _VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return str(uuid.uuid4())
