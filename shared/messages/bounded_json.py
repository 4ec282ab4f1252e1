"""Parsing untrusted JSON within limits: nesting depth, number of fields, numbers, valid Unicode.

Why not just `json.loads` and catch what goes wrong: a 64 KiB frame of `[[[[…` makes the parser
recurse until RecursionError, a 5,000-digit integer costs quadratic time to convert (and then
raises), `1e999999` quietly becomes `inf`, and `"\\ud800"` becomes a str that cannot be encoded
again, so the bus message built from it fails later, far from the client. Every limit here is
checked before or while the parser builds anything, at C speed:

1. Strings are blanked out with one regular-expression pass (possessive, so it cannot backtrack),
   leaving the document's structure.
2. The number of fields (object keys plus array items, in all) is counted from that structure
   alone: each non-empty container with k children has k - 1 commas, so
   fields = commas + containers - empty containers. Over the limit: refused unparsed.
3. Since every container but the outermost is itself a field, nesting is then at most
   fields + 1 deep, so the parser can no longer recurse deeply; numbers are checked by the
   parser's hooks as it meets them (length first, so no long conversion ever runs).
4. The parsed value (at most a few dozen containers) is walked for its exact depth and for
   strings that are not valid Unicode.

The caller bounds the frame's size."""
from __future__ import annotations

import json
import math
import re
from typing import Any

_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_EMPTY_CONTAINER = re.compile(r"[\[{]\s*+[\]}]")
MAX_NUMBER_CHARS = 32  # a number literal longer than this is refused before it is converted
MAX_INTEGER = 2**63 - 1  # integers beyond a signed 64-bit value are refused


class JsonLimitError(ValueError):
    """The text is not JSON within the limits; the message is safe to show (it quotes no input)."""


def loads(text: str, *, max_depth: int, max_fields: int) -> Any:
    """Parse `text`, or raise JsonLimitError (too big, too deep, bad number, bad Unicode) or
    ValueError (not JSON)."""
    skeleton = _STRING.sub('""', text)
    containers = skeleton.count("[") + skeleton.count("{")
    filled = containers - len(_EMPTY_CONTAINER.findall(skeleton))
    fields = skeleton.count(",") + filled
    if fields > max_fields:
        if filled > max_depth:  # depth is not known before parsing; say both
            raise JsonLimitError(f"nested deeper than {max_depth} levels or more than {max_fields} fields")
        raise JsonLimitError(f"more than {max_fields} fields")
    value = json.loads(text, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    _check_value(value, max_depth)
    return value


def _integer(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonLimitError("a number is too large")
    number = int(literal)
    if abs(number) > MAX_INTEGER:
        raise JsonLimitError("a number is too large")
    return number


def _float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonLimitError("a number is too long")
    number = float(literal)
    if not math.isfinite(number):
        raise JsonLimitError("a number is out of range")
    return number


def _constant(literal: str) -> Any:
    raise JsonLimitError("NaN and Infinity are not JSON")


def _check_value(value: Any, max_depth: int) -> None:
    """Exact nesting depth, and every string (keys too) encodable as UTF-8."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, (dict, list)):
            if depth + 1 > max_depth:
                raise JsonLimitError(f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_string(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonLimitError("a string is not valid Unicode (a lone surrogate escape)") from None
