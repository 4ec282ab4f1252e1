"""Fixtures shared by every test: a real Redis, isolated names per test, models loaded once."""
from __future__ import annotations

import uuid

import pytest

from shared.bus import create_redis
from shared.config import Settings
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.redis_server import TestRedis
from tests.support.stack import run_stack


@pytest.fixture(scope="session")
def redis_url():
    server = TestRedis()
    yield server.url
    server.stop()


def make_settings(redis_url: str, **overrides) -> Settings:
    """Settings whose every Redis key and channel is unique to one test."""
    ns = f"test-{uuid.uuid4().hex[:10]}"
    values = dict(
        redis_url=redis_url,
        namespace=ns,
        connection_events_channel=f"{ns}:connection_events",
        tts_control_channel=f"{ns}:tts_control",
        heartbeat_interval_s=0.2,
        worker_ttl_s=2.0,
        stale_timeout_s=10.0,
        resume_window_s=60,
        api_keys=["test-admin-key"],
        health_log_interval_s=0,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(redis_url) -> Settings:
    return make_settings(redis_url)


@pytest.fixture
async def redis_client(settings):
    client = create_redis(settings.redis_url_or_default)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{settings.namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(scope="session")
def transcriber():
    from workers.vad_stt.stt import Transcriber

    model = Transcriber()
    model.warm_up()
    return model


@pytest.fixture(scope="session")
def voice():
    from workers.tts.voice import Voice

    return Voice()


@pytest.fixture
def fake_llm():
    with FakeLlmServer(FakeLlm()) as llm:
        yield llm


@pytest.fixture
async def stack(settings, redis_client, transcriber, voice, fake_llm):
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as running:
        yield running
