"""What never reaches a log line: URL passwords (redacted) and user content (unless LOG_CONTENT)."""
from __future__ import annotations

import logging

import pytest

from shared.bus import create_redis
from shared.logging import log_content, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("redis://app:s3cret@10.0.0.5:6379/0", "redis://app:***@10.0.0.5:6379/0"),
        ("rediss://:s3cret@cache.example.com:6380/2", "rediss://:***@cache.example.com:6380/2"),
        ("rediss://app:s3cret@cache.example.com/0?ssl_ca_certs=/etc/ca.pem", "rediss://app:***@cache.example.com/0?ssl_ca_certs=/etc/ca.pem"),
        ("redis://10.0.0.5:6379/0?password=s3cret", "redis://10.0.0.5:6379/0?password=***"),
        ("redis://10.0.0.5/0?db=1&password=s3cret&socket_timeout=5", "redis://10.0.0.5/0?db=1&password=***&socket_timeout=5"),
        ("redis://:p%40ss@h:1/0", "redis://:***@h:1/0"),  # percent-encoded
        ("redis://:p@ss@h:1/0", "redis://:***@h:1/0"),  # an unencoded @ in the password
        ("redis://h/0?pass%77ord=s3cret", "redis://h/0?pass%77ord=***"),  # an encoded key is still a password
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),  # a user name alone is no secret
        ("redis://:s3cret@[::1:6379/0", "redis://***"),  # unparsable: nothing of it is shown
    ],
)
def test_redact_url_masks_every_password_form(url, shown):
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


async def test_every_redis_url_form_is_accepted_by_the_pool():
    """Parsing only: the live forms (password, ?password=, TLS) are tested against real servers in
    tests/integration/test_redis_auth.py."""
    from redis.asyncio.connection import SSLConnection

    for url in ("redis://:pw@h:1/0", "redis://u:pw@h:1/0", "redis://h:1/0?password=pw", "rediss://:pw@h:1/0?ssl_cert_reqs=none"):
        client = create_redis(url)
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["password"] == "pw"
        assert (client.connection_pool.connection_class is SSLConnection) == url.startswith("rediss")
        await client.aclose()


def test_content_is_logged_only_when_enabled_else_at_debug_only(caplog):
    log = logging.getLogger("voicepipe.test-content")
    with caplog.at_level(logging.INFO, logger="voicepipe.test-content"):
        log_content(log, False, "transcribed in %d ms", 12, content="my card number is 1234")
        log_content(log, True, "transcribed in %d ms", 12, content="hello there")
    assert [r.getMessage() for r in caplog.records] == [
        "transcribed in 12 ms (22 characters)",
        "transcribed in 12 ms: 'hello there'",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="voicepipe.test-content"):
        log_content(log, False, "transcribed in %d ms", 12, content="my card number is 1234", level=logging.WARNING)
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and "1234" in record.getMessage()
