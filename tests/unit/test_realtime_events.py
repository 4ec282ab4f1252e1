"""The Realtime wire vocabulary (gateway/realtime_events.py): every server event it makes is valid
for the stock `openai` SDK's own models, in the order a Realtime client expects, and client events
are parsed within limits into typed events or a clear error."""
import base64

import pytest
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from gateway.realtime_events import (
    InputAudioAppend,
    ItemCreate,
    ItemTruncate,
    RealtimeError,
    RealtimeTurns,
    ResponseCancel,
    Session,
    SessionUpdate,
    decode_audio,
    parse_client_event,
    user_text,
)
from shared.messages.client import JsonLimits

SDK = TypeAdapter(RealtimeServerEvent)
LIMITS = JsonLimits()


def valid(events):
    """Each event parses as the SDK's model of its type; returns the types in order."""
    for event in events:
        parsed = SDK.validate_python(event)
        assert parsed.type == event["type"]
    assert len({e["event_id"] for e in events}) == len(events)
    return [e["type"] for e in events]


def test_a_spoken_turn_in_order():
    turns = RealtimeTurns(Session())
    events = [turns.session_created()]
    events += turns.speech_started("t1", 120)
    events += turns.speech_stopped("t1", 2100)
    events += turns.transcribed("t1", "What is the capital of France?", 1.98)
    events += turns.text_delta("t1", "Paris")
    events += turns.audio_delta("t1", b"\x01\x00" * 480)
    events += turns.text_delta("t1", " is.")
    events += turns.response_done("t1", text="Paris is.")
    assert valid(events) == [
        "session.created",
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.input_audio_transcription.completed", "conversation.item.done",
        "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_audio_transcript.delta", "response.output_audio.delta", "response.output_audio_transcript.delta",
        "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
    ]
    user = {e["item_id"] for e in events if e["type"].startswith("input_audio_buffer.")}
    assert len(user) == 1  # one user item throughout
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == "Paris is."
    assert {e["response_id"] for e in events if "response_id" in e} == {done["id"]}
    audio = next(e for e in events if e["type"] == "response.output_audio.delta")
    assert base64.b64decode(audio["delta"]) == b"\x01\x00" * 480


@pytest.mark.parametrize("reason", ["turn_detected", "client_cancelled"])
def test_a_cancelled_response(reason):
    turns = RealtimeTurns(Session())
    events = turns.typed("t1", "Tell me a story.") + turns.text_delta("t1", "Once") + turns.response_done("t1", "cancelled", reason)
    valid(events)
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"] == {"type": "cancelled", "reason": reason}
    assert done["output"][0]["status"] == "incomplete"


def test_a_failed_response_and_a_text_only_session():
    session = Session()
    session.update({"output_modalities": ["text"]})
    turns = RealtimeTurns(session)
    events = turns.typed("t1", "Hi") + turns.text_delta("t1", "Hel") + turns.audio_delta("t1", b"\0\0")
    events += turns.response_done("t1", "failed", error={"type": "server_error", "code": "llm_unavailable"})
    types = valid(events)
    assert "response.output_text.delta" in types and "response.output_audio.delta" not in types
    assert events[-1]["response"]["status_details"]["error"]["code"] == "llm_unavailable"


def test_errors_truncation_and_cleared_are_valid():
    turns = RealtimeTurns(Session())
    valid([turns.error("unsupported_event", "unsupported event type 'x'", "evt_1", "type"), turns.truncated("item_1", 1500), turns.cleared()])


def test_session_update_applies_all_or_nothing():
    session = Session()
    session.update({"instructions": "Be brief.", "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}})
    assert (session.instructions, session.server_vad, session.silence_duration_ms) == ("Be brief.", True, 300)
    session.update({"audio": {"input": {"turn_detection": None}}})
    assert session.server_vad is False
    with pytest.raises(RealtimeError) as refused:
        session.update({"instructions": "changed", "audio": {"output": {"format": {"type": "audio/pcmu"}}}})
    assert refused.value.code == "unsupported_format" and refused.value.param == "session.audio.output.format"
    assert session.instructions == "Be brief."  # nothing of the refused update was applied
    valid([RealtimeTurns(session).session_updated()])


def test_client_events_are_parsed_within_limits():
    assert isinstance(parse_client_event('{"type": "session.update", "session": {}}', LIMITS), SessionUpdate)
    assert isinstance(parse_client_event('{"type": "response.cancel"}', LIMITS), ResponseCancel)
    truncate = parse_client_event('{"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": 800}', LIMITS)
    assert isinstance(truncate, ItemTruncate) and truncate.audio_end_ms == 800
    append = parse_client_event('{"type": "input_audio_buffer.append", "audio": "AQACAA=="}', LIMITS)
    assert isinstance(append, InputAudioAppend) and decode_audio(append) == b"\x01\x00\x02\x00"
    with pytest.raises(RealtimeError) as unknown:
        parse_client_event('{"type": "output_audio_buffer.clear", "event_id": "e9"}', LIMITS)
    assert (unknown.value.code, unknown.value.event_id) == ("unsupported_event", "e9")
    assert "output_audio_buffer.clear" in unknown.value.message
    for bad in ("[" * 30000, '{"type": 5}', "not json", '{"type": "conversation.item.truncate", "item_id": "i"}'):
        with pytest.raises(RealtimeError) as refused:
            parse_client_event(bad, LIMITS)
        assert refused.value.code == "invalid_event" and len(refused.value.message) < 200
    with pytest.raises(RealtimeError):
        decode_audio(InputAudioAppend(type="input_audio_buffer.append", audio="AQAC"))  # three bytes


def test_only_user_text_items_are_created():
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": " Hello "}]}
    assert user_text(ItemCreate(type="conversation.item.create", item=item)) == "Hello"
    for bad in ({"type": "message", "role": "assistant", "content": []},
                {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]},
                {"type": "function_call_output", "output": "{}"}):
        with pytest.raises(RealtimeError) as refused:
            user_text(ItemCreate(type="conversation.item.create", item=bad))
        assert refused.value.code == "unsupported_item"
