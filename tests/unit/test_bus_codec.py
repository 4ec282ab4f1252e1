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
    AudioIn(received_ms=1.5, pcm=b'{"type": "x"}\x00\x01\x02', **ENV), AudioCommit(received_ms=2, **ENV),
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


def _binary(header: bytes, pcm: bytes = b"", size: int | None = None) -> bytes:
    return b"\x00" + (len(header) if size is None else size).to_bytes(4, "big") + header + pcm


AUDIO_HEADER = b'{"type": "audio.in", "conversation_id": "c", "received_ms": 1}'
SECRET = "do-not-log-this-transcript"
MALFORMED = {
    "json nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    "object nested too deeply": b'{"type": "text.input", "conversation_id": "c", "text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "binary header nested too deeply": _binary(b"[" * 100_000),
    "binary header dict nested too deeply": _binary(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
    "length prefix overruns the data": _binary(AUDIO_HEADER, b"\x00\x00", size=2**32 - 1),
    "length prefix one past the end": _binary(AUDIO_HEADER, size=len(AUDIO_HEADER) + 1),
    "length prefix cut short": b"\x00\x00\x00",
    "length prefix cuts the header": _binary(AUDIO_HEADER, size=10),
    "binary header not an object": _binary(b'["audio.in"]', b"\x00\x00"),
    "binary header not UTF-8": _binary(b'{"type": "\xff\xfe"}'),
    "JSON not UTF-8": b'{"type": "text.input", "conversation_id": "\xff\xfe", "text": "x"}',
    "wrong field types": b'{"type": "text.input", "conversation_id": 5, "text": ["' + SECRET.encode() + b'"]}',
    "wrong field types in audio": _binary(b'{"type": "audio.in", "conversation_id": "c", "received_ms": "soon"}', b"\x00\x00"),
    "missing fields": b'{"type": "transcript.final", "conversation_id": "c"}',
    "NaN in JSON": b'{"type": "audio.commit", "conversation_id": "c", "received_ms": NaN}',
    "NaN in a binary header": _binary(b'{"type": "audio.in", "conversation_id": "c", "received_ms": NaN}', b"\x00\x00"),
    "infinity": b'{"type": "speech.stopped", "conversation_id": "c", "speech_end_ms": 1e999, "decided_ms": 1}',
    "odd-length audio": _binary(AUDIO_HEADER, b"\x00\x00\x00"),
    "audio on a message without audio": _binary(b'{"type": "tts.speak", "conversation_id": "c", "text": "x", "seq": 0}', b"\x00\x00"),
    "audio inside JSON": b'{"type": "audio.in", "conversation_id": "c", "received_ms": 1, "pcm": "abcd"}',
    "a bare string": b'"' + SECRET.encode() + b'"',
    "unknown type with content": b'{"type": "nope", "conversation_id": "c", "text": "' + SECRET.encode() + b'"}',
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_only_a_short_decode_error_that_quotes_nothing(data):
    with pytest.raises(DecodeError) as caught:
        decode(data)
    message = str(caught.value)
    assert len(message) < 300 and SECRET not in message
    assert caught.value.__cause__ is None  # nothing chained that a log line could print


def test_audio_of_whole_samples_still_decodes():
    message = decode(_binary(AUDIO_HEADER, b"\x01\x02\x03\x04"))
    assert isinstance(message, AudioIn) and message.pcm == b"\x01\x02\x03\x04"
    assert decode(_binary(AUDIO_HEADER)).pcm == b""


@pytest.mark.parametrize(
    "data",
    [
        b'{"type": "tts.end", "conversation_id": "c", "sentences": ' + b"9" * 5000 + b"}",
        _binary(b'{"type": "audio.in", "conversation_id": "c", "received_ms": ' + b"9" * 5000 + b"}", b"\x00\x00"),
        b'{"type": "ping"}' * 1000,
        bytes(range(256)) * 100,
    ],
    ids=["huge integer", "huge integer in a binary header", "concatenated objects", "binary noise"],
)
def test_odd_input_is_a_message_or_a_decode_error_never_anything_else(data):
    try:
        decode(data)
    except DecodeError:
        pass


def test_a_unix_socket_url_makes_a_working_pool():
    """`VOICEPIPE_REDIS_URL=unix:///path/redis.sock` (Redis on the same machine): no TCP-only option
    reaches the connection (redis-py refuses `socket_keepalive` there)."""
    from redis.asyncio.connection import UnixDomainSocketConnection

    from shared.bus import create_redis

    client = create_redis("unix:///tmp/voicepipe-test.sock?db=0", name="t")
    pool = client.connection_pool
    assert pool.connection_class is UnixDomainSocketConnection
    connection = pool.make_connection()  # raised TypeError before
    assert connection.path == "/tmp/voicepipe-test.sock"
