"""The client protocol's text frames (docs/protocol.md §1)."""
import json

import pytest

from shared.messages.client import (
    BadClientMessage, InputAudioCommit, Ping, ResponseCancelRequest, TextInputRequest, parse_client_message, server_event,
)


@pytest.mark.parametrize(
    "frame, kind",
    [
        ('{"type": "input_audio.commit"}', InputAudioCommit),
        ('{"type": "text.input", "text": "hi"}', TextInputRequest),
        ('{"type": "response.cancel"}', ResponseCancelRequest),
        ('{"type": "ping", "extra": 1}', Ping),
    ],
)
def test_valid_messages(frame, kind):
    assert isinstance(parse_client_message(frame), kind)


@pytest.mark.parametrize(
    "frame, reason",
    [
        ("{oops", "invalid JSON"),
        ('"ping"', "JSON object"),
        ('{"text": "hi"}', "JSON object with a string 'type'"),
        ('{"type": "launch"}', "unknown message type 'launch'"),
        ('{"type": "text.input", "text": ""}', "text.input: text"),
        ('{"type": "text.input"}', "text.input: text"),
    ],
)
def test_bad_messages_say_why(frame, reason):
    with pytest.raises(BadClientMessage, match=reason.replace(".", r"\.")):
        parse_client_message(frame)


def test_server_events_carry_turn_id_only_when_there_is_a_turn():
    assert json.loads(server_event("pong")) == {"type": "pong"}
    assert json.loads(server_event("speech.started", "t1")) == {"type": "speech.started", "turn_id": "t1"}


def test_blank_text_and_deep_nesting_are_bad_messages():
    import pytest

    from shared.messages.client import BadClientMessage, parse_client_message

    for frame in ('{"type": "text.input", "text": "   "}', "[" * 30000 + "]" * 30000):
        with pytest.raises(BadClientMessage):
            parse_client_message(frame)
    assert parse_client_message('{"type": "text.input", "text": " hi "}').text == "hi"
