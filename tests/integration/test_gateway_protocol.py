"""The client protocol of docs/protocol.md §1 and the health routes of §3, over real sockets."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from pathlib import Path

import httpx
import pytest
import websockets

from shared.stages import STAGES
from tests.conftest import make_settings
from tests.support.stack import run_stack
from tests.support.ws import connect, next_event, refused_status, wait_closed
from voicepipe.client import SessionRefused, VoiceClient
from voicepipe.talk import talk


async def test_session_started_describes_the_conversation(stack, voice):
    ws, started = await connect(stack.ws_url, additional_headers={"X-Correlation-ID": "corr-123"})
    try:
        assert started["correlation_id"] == "corr-123"
        assert len(started["conversation_id"]) == 36
        assert started["resume_token"] and started["resumed"] is False
        assert started["input_audio"] == {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
        assert started["output_audio"] == {"encoding": "pcm_s16le", "sample_rate": voice.sample_rate, "channels": 1}
    finally:
        await ws.close()


async def test_ping_gets_pong(stack):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ("{not json", "invalid JSON"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ("[1, 2]", "JSON object"),
        ('{"type": "text.input", "text": ""}', "text"),
    ],
)
async def test_bad_message_gets_an_error_and_the_connection_stays(stack, frame, fragment):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(frame)
        error = await next_event(ws)
        assert error["type"] == "error" and error["code"] == "bad_message"
        assert fragment in error["message"]
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"


async def test_odd_length_audio_is_refused_and_the_connection_stays(stack):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(bytes(641))
        error = await next_event(ws)
        assert error["type"] == "error" and error["code"] == "bad_audio"
        await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"


async def test_audio_frame_over_64_kib_closes_1009(stack):
    ws, _ = await connect(stack.ws_url)
    await ws.send(bytes(65536))  # exactly 64 KiB is allowed
    await ws.send(json.dumps({"type": "ping"}))
    assert (await next_event(ws))["type"] == "pong"
    await ws.send(bytes(65538))
    assert await wait_closed(ws) == 1009


async def test_health_and_readiness(stack):
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        health = await client.get("/healthz", headers={"X-Correlation-ID": "abc"})
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert health.headers["X-Correlation-ID"] == "abc"
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["workers"] == {stage: 1 for stage in STAGES}
        assert len(ready.headers["X-Correlation-ID"]) == 36
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/v1/ws" in page.text


async def test_not_ready_without_workers(redis_url, redis_client, fake_llm):
    settings = make_settings(redis_url)
    async with run_stack(settings, stages=("llm",), llm_base_url=fake_llm.base_url) as stack:
        async with httpx.AsyncClient(base_url=stack.http_url) as client:
            async with asyncio.timeout(10):
                while (ready := await client.get("/readyz")).json().get("workers", {}).get("llm") != 1:
                    await asyncio.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["missing"] == ["vad_stt", "tts"]
        ws = await websockets.connect(stack.ws_url)
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error" and error["code"] == "not_ready"
        assert await wait_closed(ws) == 1011
        # the protocol client says so with the server's own event, and `talk` in one line
        with pytest.raises(SessionRefused) as refused:
            await VoiceClient(stack.ws_url).open()
        assert refused.value.event["code"] == "not_ready"
        fixture = Path(__file__).parent.parent / "fixtures" / "hello.wav"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = await asyncio.to_thread(talk, str(fixture), stack.ws_url, os.devnull)
        assert code == 1 and "refused the conversation: not_ready" in err.getvalue() and "Traceback" not in err.getvalue()


async def test_client_token_is_required_when_configured(redis_url, redis_client, transcriber, voice, fake_llm):
    """Refused before the upgrade with HTTP 403 (tests/integration/test_edge.py has every form)."""
    settings = make_settings(redis_url, client_tokens=["sesame", "other"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        assert (await refused_status(stack.ws_url))[0] == 403
        assert (await refused_status(stack.ws_url + "?token=wrong"))[0] == 403
        ws, started = await connect(stack.ws_url + "?token=sesame")
        await ws.close()
        assert stack.gateway.stats.rejected == 2


async def test_disallowed_origin_gets_403(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, allowed_origins=["https://voice.example"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        assert (await refused_status(stack.ws_url, origin="https://evil.example"))[0] == 403
        ws, _ = await connect(stack.ws_url, origin="https://voice.example")
        await ws.close()


async def test_closing_the_socket_publishes_connection_disconnected(stack, redis_client, settings):
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(settings.connection_events_channel)
    try:
        ws, started = await connect(stack.ws_url, additional_headers={"X-Correlation-ID": "bye-1"})
        await ws.close()
        async with asyncio.timeout(5):
            while (raw := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)) is None:
                pass
        # the lease is gone by the time anyone hears the event (workers' sweeps rely on that order)
        assert not await redis_client.exists(f"{settings.namespace}:conv:{started['conversation_id']}")
        event = json.loads(raw["data"])
        assert event["type"] == "connection_disconnected"
        assert event["conversation_id"] == started["conversation_id"]
        assert event["reason"] == "client_disconnect"
        assert isinstance(event["timestamp_ms"], int) and event["timestamp_ms"] > 1_700_000_000_000
        assert event["correlation_id"] == "bye-1"
    finally:
        await pubsub.aclose()
