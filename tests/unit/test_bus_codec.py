"""Bus messages: every type round-trips; audio travels as raw bytes; bad input is refused."""
import json

import pytest
from pydantic import ValidationError

from shared.messages import (
    AudioCommit, AudioIn, ConnectionDisconnected, IntrospectReply, IntrospectRequest, ResponseCancel,
    ResponseTextDelta, ResponseTextDone, SessionTakeover, SpeechStarted, SpeechStopped, StageError, TextInput,
    TranscriptFinal, TranscriptPartial, TtsAudio, TtsAudioDone, TtsAudioStarted, TtsEnd, TtsSpeak, TtsStop,
)
from shared.messages.codec import DecodeError, decode, encode

ENV = {"conversation_id": "c1", "turn_id": "t1", "correlation_id": "x", "source": "test"}
SAMPLES = [
    AudioIn(received_ms=1.5, pcm=b'{"type": "x"}\x00\x01', **ENV), AudioCommit(received_ms=2, **ENV),
    SpeechStarted(**ENV), SpeechStopped(speech_end_ms=1, decided_ms=2, **ENV), TranscriptPartial(text="he", **ENV),
    TranscriptFinal(text="hello", stt_ms=3, stt_wait_ms=1, **ENV), TextInput(text="hi", **ENV),
    ResponseTextDelta(delta="He", **ENV), ResponseTextDone(text="Hey.", sentences=1, llm_ms=5, **ENV),
    ResponseCancel(**ENV), TtsSpeak(text="Hey.", seq=0, **ENV), TtsEnd(sentences=1, **ENV), TtsStop(**ENV),
    TtsAudioStarted(sample_rate=22050, **ENV), TtsAudio(seq=3, pcm=bytes(range(256)), **ENV),
    TtsAudioDone(tts_ms=9, **ENV), ConnectionDisconnected(conversation_id="c1", reason="timeout"),
    StageError(code="llm_unavailable", message="down", **ENV),
    IntrospectRequest(conversation_id="", request_id="r", reply_to="inbox"),
    IntrospectReply(conversation_id="c1", request_id="r", worker_id="w", stage="tts", last_heartbeat_ms=1,
                    conversations=1, resources={"conversations": 1}, holds={"x": 0}),
    SessionTakeover(connection_id="k", **ENV),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


def test_audio_is_raw_bytes_behind_a_header():
    message = SAMPLES[0]
    data = encode(message)
    assert data.endswith(message.pcm) and b"pcm" not in data[: -len(message.pcm)]


def test_connection_disconnected_has_the_four_required_fields():
    event = json.loads(encode(ConnectionDisconnected(conversation_id="c9", reason="client_disconnect", gateway_id="g")))
    assert event["type"] == "connection_disconnected" and event["conversation_id"] == "c9"
    assert event["reason"] == "client_disconnect" and isinstance(event["timestamp_ms"], int)
    external = {"type": "connection_disconnected", "conversation_id": "x", "timestamp_ms": 1, "reason": "timeout"}
    assert decode(json.dumps(external)).reason == "timeout"
    with pytest.raises(ValidationError):
        ConnectionDisconnected(conversation_id="x", reason="bored")


@pytest.mark.parametrize("garbage", [b"", b"garbage", b'{"type": "nope", "conversation_id": "c"}', b"\x00\x00\x00\x00\x09{", "[]"])
def test_garbage_is_refused(garbage):
    with pytest.raises(DecodeError):
        decode(garbage)
