"""Client JSON within limits (shared/messages/bounded_json.py, shared/messages/client.py)."""
import json

import pytest

from shared.messages.bounded_json import JsonLimitError, loads
from shared.messages.client import BadClientMessage, JsonLimits, Ping, TextInputRequest, excerpt, parse_client_message


def fields_object(n: int) -> str:
    return "{" + ",".join(f'"f{i}": {i}' for i in range(n)) + "}"


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize(
    "text, count",
    [
        ("{}", 0), ("[]", 0), ('"x"', 0), ("[[]]", 1), ("[[],[],[]]", 3), ('{"a": [], "b": {}}', 2),
        ('{"a": [1, 2, {"b": null}]}', 5), ('["a,b", "{[", "\\"]\\""]', 3), ("[ [ ] , { } ]", 2),
    ],
)
def test_fields_are_counted_exactly_from_the_structure(text, count):
    assert loads(text, max_depth=16, max_fields=count) == json.loads(text)
    if count:
        with pytest.raises(JsonLimitError, match="fields"):
            loads(text, max_depth=16, max_fields=count - 1)


def test_the_field_limit_is_exact():
    assert len(loads(fields_object(64), max_depth=16, max_fields=64)) == 64
    with pytest.raises(JsonLimitError, match="more than 64 fields"):
        loads(fields_object(65), max_depth=16, max_fields=64)
    assert len(loads("[" + ",".join(["0"] * 64) + "]", max_depth=16, max_fields=64)) == 64
    with pytest.raises(JsonLimitError):
        loads("[" + ",".join(["0"] * 65) + "]", max_depth=16, max_fields=64)


def test_the_depth_limit_is_exact():
    assert loads(nested(16), max_depth=16, max_fields=64)
    with pytest.raises(JsonLimitError, match="nested deeper than 16"):
        loads(nested(17), max_depth=16, max_fields=64)
    deep_object = '{"a":' * 17 + "1" + "}" * 17
    with pytest.raises(JsonLimitError, match="nested deeper than 16"):
        loads(deep_object, max_depth=16, max_fields=64)


@pytest.mark.parametrize("frame", [nested(30000), '{"a":' * 10000 + "1" + "}" * 10000, "[" * 60000, "{" * 60000])
def test_deep_nesting_is_refused_before_the_parser_recurses(frame):
    assert len(frame) < 65536
    with pytest.raises(JsonLimitError):
        loads(frame, max_depth=16, max_fields=64)


@pytest.mark.parametrize(
    "literal", ["1e999999", "-1e999999", "9" * 5000, "-" + "9" * 5000, "9223372036854775808", "1." + "0" * 100, "NaN", "Infinity", "-Infinity"]
)
def test_huge_and_non_json_numbers_are_refused(literal):
    with pytest.raises(JsonLimitError):
        loads('{"type": "ping", "n": %s}' % literal, max_depth=16, max_fields=64)


def test_ordinary_numbers_pass():
    value = loads('{"a": 9223372036854775807, "b": -1.5e300, "c": 0.1}', max_depth=16, max_fields=64)
    assert value == {"a": 9223372036854775807, "b": -1.5e300, "c": 0.1}


@pytest.mark.parametrize("text", ['"\\ud800"', '{"\\udfff": 1}', '["ok", "a\\udc00b"]'])
def test_lone_surrogates_are_refused(text):
    with pytest.raises(JsonLimitError, match="Unicode"):
        loads(text, max_depth=16, max_fields=64)
    assert loads('"\\ud83d\\ude00"', max_depth=16, max_fields=64) == "\U0001f600"  # a proper pair is fine


def test_strings_full_of_structure_characters_are_not_structure():
    text = json.dumps({"type": "text.input", "text": "[{,:}]" * 1300})
    assert parse_client_message(text).text == "[{,:}]" * 1300


def test_client_messages_use_the_limits_and_quote_little():
    limits = JsonLimits(max_depth=2, max_fields=3)
    assert isinstance(parse_client_message('{"type": "ping", "x": [1]}', limits), Ping)
    with pytest.raises(BadClientMessage, match="nested deeper than 2"):
        parse_client_message('{"type": "ping", "x": [[1]]}', limits)
    with pytest.raises(BadClientMessage, match="more than 3 fields"):
        parse_client_message('{"type": "ping", "a": 1, "b": 2, "c": 3}', limits)
    with pytest.raises(BadClientMessage) as refused:
        parse_client_message(json.dumps({"type": "x" * 60000}))
    assert len(str(refused.value)) < 80 and str(refused.value).endswith("…")
    assert excerpt("short") == "'short'" and excerpt("y" * 100) == "'" + "y" * 40 + "'…"


@pytest.mark.parametrize(
    "frame",
    ["", "null", "5", '"ping"', "[]", '{"type": 5}', '{"type": null}', '{"type": ["ping"]}',
     '{"type": "text.input", "text": 5}', '{"type": "text.input", "text": ["a"]}',
     '{"type": "text.input", "text": null}', '{"type": "text.input", "text": "' + "a" * 8001 + '"}',
     '{"type": "text.input", "text": "\\ud800"}'],
)
def test_wrong_types_are_bad_messages(frame):
    with pytest.raises(BadClientMessage):
        parse_client_message(frame)


def test_typed_text_is_kept_whole():
    assert isinstance(parse_client_message('{"type": "text.input", "text": "caf\\u00e9 \\ud83d\\ude00"}'), TextInputRequest)
