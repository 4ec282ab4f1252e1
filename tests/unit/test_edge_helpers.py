"""The gateway's edge, piece by piece: tokens, proxies, identities, correlation ids, close reasons,
the outbound byte budget and the log filter that keeps secrets out of logs."""
import asyncio
import time
import logging
import re

import pytest

from gateway import auth
from gateway.correlation import correlation_id
from gateway.handshake import close_reason
from gateway.outbound import Outbound
from shared.config import Settings
from shared.logging import RedactSecrets

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_tokens_are_read_from_the_query_the_bearer_header_and_the_subprotocol():
    assert auth.presented_tokens("q", None, ()) == [b"q"]
    assert auth.presented_tokens(None, b"Bearer h", ()) == [b"h"]
    assert auth.presented_tokens(None, b"bearer   h2 ", ()) == [b"h2"]
    assert auth.presented_tokens(None, b"Basic xyz", ()) == []
    assert auth.presented_tokens(None, None, ["voicepipe.v1", "token.s", "token.t"]) == [b"s"]
    assert auth.presented_tokens("é", "Bearer é".encode("utf-8"), ["token.é".encode("utf-8").decode("latin-1")]) == [
        "é".encode("utf-8")
    ] * 3
    # uvicorn decodes a header to text as latin-1 (websockets 17) or as ASCII with surrogate escapes (before)
    sent = "token.sésame".encode("utf-8")
    for decoded in (sent.decode("latin-1"), sent.decode("ascii", "surrogateescape")):
        assert auth.presented_tokens(None, None, [decoded]) == ["sésame".encode("utf-8")]
    assert auth.presented_tokens(None, None, ["token.\u2603"]) == ["\u2603".encode("utf-8")]  # never raises


def test_tokens_compare_as_bytes_so_non_ascii_never_raises():
    configured = [auth.as_bytes("sesame"), auth.as_bytes("sésame")]
    assert auth.valid_client_token([b"wrong", "sésame".encode("utf-8")], configured) == "sésame".encode("utf-8")
    assert auth.valid_client_token(["ünknown".encode("utf-8"), b"\xff\xfe", auth.as_bytes("\ud800")], configured) is None
    assert auth.api_key_valid("key-1", ["key-0", "key-1"])
    assert not auth.api_key_valid("ключ", ["key-1"]) and not auth.api_key_valid("", ["key-1"])
    assert not auth.api_key_valid("key-1", [])
    assert auth.api_key_valid("clé".encode("utf-8").decode("latin-1"), ["clé"])  # a UTF-8 key sent raw in a header


def test_origins():
    assert auth.origin_allowed(None, ["https://a.example"])  # CLI and server clients send none
    assert auth.origin_allowed(b"https://x.example", [])
    assert auth.origin_allowed(b"https://a.example", ["https://a.example"])
    assert not auth.origin_allowed(b"https://" + b"e" * 120 + b".example", ["https://a.example"])


@pytest.mark.parametrize(
    "peer, forwarded, expected",
    [
        ("203.0.113.5", b"10.1.1.1", "203.0.113.5"),  # not from a proxy: the header is ignored
        ("10.0.0.2", None, "10.0.0.2"),
        ("10.0.0.2", b"198.51.100.7", "198.51.100.7"),
        ("10.0.0.2", b"6.6.6.6, 198.51.100.7", "198.51.100.7"),  # the left entry is the client's own claim
        ("10.0.0.2", b"198.51.100.7, 10.0.0.3", "198.51.100.7"),  # a chain of trusted proxies
        ("10.0.0.2", b"10.0.0.4, 10.0.0.3", "10.0.0.4"),  # nothing but proxies: the left-most
        ("10.0.0.2", b"not-an-ip", "10.0.0.2"),
        ("10.0.0.2", b"2001:db8::1", "2001:db8::1"),
    ],
)
def test_the_client_address_behind_trusted_proxies(peer, forwarded, expected):
    proxies = auth.parse_networks(["10.0.0.0/24", "::1"])
    assert auth.client_address(peer, forwarded, proxies) == expected


def test_bad_trusted_proxies_are_a_settings_error():
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        auth.parse_networks(["10.0.0.0/33"])
    with pytest.raises(ValueError, match="not an IP address or network"):
        Settings(_env_file=None, trusted_proxies="10.0.0.1, proxy.internal")
    assert Settings(_env_file=None, trusted_proxies="10.0.0.1, 192.168.0.0/16, ::1").trusted_proxies == [
        "10.0.0.1", "192.168.0.0/16", "::1"
    ]


def test_identities_never_contain_the_token():
    by_token = auth.ClientIdentity.of(b"sesame", "127.0.0.1")
    assert "sesame" not in by_token.key + by_token.label and by_token.key.startswith("t-")
    assert by_token == auth.ClientIdentity.of(b"sesame", "10.9.9.9")  # the token is who you are
    by_address = auth.ClientIdentity.of(None, "127.0.0.1")
    assert by_address.label == "address 127.0.0.1" and by_address.key != by_token.key


@pytest.mark.parametrize(
    "value, kept",
    [(b"abc-123", True), (b"a.b:c_d-9", True), (b"x" * 128, True), (b"x" * 129, False), (b"", False),
     (b"has space", False), (b"quote\"d", False), (b"new\nline", False), ("caf\u00e9".encode(), False), (b"\xff\xfe", False)],
)
def test_correlation_ids_are_taken_only_when_safe(value, kept):
    found = correlation_id([(b"x-other", b"1"), (b"x-correlation-id", value)])
    assert (found == value.decode("latin-1")) is kept
    if not kept:
        assert UUID4.fullmatch(found)
    assert UUID4.fullmatch(correlation_id([]))


def test_close_reasons_fit_a_close_frame():
    assert close_reason("short") == "short"
    long = "é" * 100  # 200 bytes of UTF-8
    assert len(close_reason(long).encode("utf-8")) <= 123 and close_reason(long) == "é" * 61


async def test_the_outbound_queue_is_bounded_in_bytes():
    queue = Outbound(max_bytes=100)
    assert queue.put(b"x" * 500)  # one frame always fits an empty queue
    assert not queue.put("y")  # over the budget: the client is too slow
    assert queue.overflowed and len(queue) == 0 and not queue.put("z")

    queue = Outbound(max_bytes=100)
    assert queue.put("a" * 60) and queue.put(b"b" * 40) and queue.queued_bytes == 100
    frame, queued_at = await queue.get()
    assert frame == "a" * 60 and queued_at <= time.perf_counter() and queue.queued_bytes == 40
    assert queue.put("c" * 60) and not queue.overflowed
    waiter = asyncio.create_task(Outbound(10).get())
    await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()


def _record(message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, message, args, None)


def test_secrets_are_redacted_from_log_records():
    redact = RedactSecrets(["sesame-token", "admin-key-1", "hunter2!", "abc"])
    record = _record('%s - "WebSocket %s" 403', "127.0.0.1:5", "/v1/ws?token=guess&conversation_id=c1&resume_token=Qm3x")
    redact.filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "WebSocket /v1/ws?token=***&conversation_id=c1&resume_token=***" 403'
    for text, gone in [
        ("key sesame-token and sesame%2Dtoken", "sesame-token"),
        ("Authorization: Bearer some.jwt.value", "some.jwt.value"),
        ("redis://:p%40ss@redis:6379/0 failed", "p%40ss"),
        ("redis://user:hunter2!@host/0", "hunter2!"),
        ("X-API-Key admin-key-1", "admin-key-1"),
        ("< sec-websocket-protocol: voicepipe.v1, token.guess-77, token.other-88", "guess-77"),
        ("< Sec-WebSocket-Protocol: token.other-88", "other-88"),
    ]:
        assert gone not in redact.redact(text), text
    assert "abc" in redact.redact("abc")  # too short to hunt for everywhere
    try:
        raise RuntimeError("connect to /v1/ws?token=sesame-token failed")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), __import__("sys").exc_info())
    redact.filter(record)
    assert "sesame-token" not in record.exc_text and "token=***" in record.exc_text


def test_settings_list_their_secrets():
    settings = Settings(
        _env_file=None, client_tokens=["t1xx"], api_keys=["k1xx"], llm_api_key="llmkey", redis_url="redis://:pw12@h:6379/0"
    )
    assert set(settings.secret_values()) == {"t1xx", "k1xx", "llmkey", "pw12"}
