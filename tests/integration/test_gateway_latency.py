"""The gateway's own latency figures (`/admin/resources/stats` `latency`), which the capacity
benchmark reads: every client frame published and every event written is counted and timed."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.support.admin import KEY, admin_get
from tests.support.ws import connect, next_event

FRAMES = 25


async def test_every_frame_published_and_event_written_is_counted_and_timed(stack):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        async with httpx.AsyncClient(base_url=stack.http_url, headers=KEY) as client:
            assert (await client.post("/admin/resources/latency/reset")).status_code == 200
        fresh = (await admin_get(stack, "/admin/resources/stats"))["latency"]
        assert fresh["audio_in"]["count"] == 0 and fresh["audio_in"]["p99_ms"] is None
        for _ in range(FRAMES):
            await ws.send(bytes(640))  # silence: published to the VAD, no turn
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"
        async with asyncio.timeout(10):  # the uplink publishes after the pong may have left
            while (latency := (await admin_get(stack, "/admin/resources/stats"))["latency"])["audio_in"]["count"] < FRAMES:
                await asyncio.sleep(0.02)
    audio_in, to_client = latency["audio_in"], latency["to_client"]
    assert audio_in["count"] == audio_in["n"] == FRAMES
    assert 0 <= audio_in["p50_ms"] <= audio_in["p99_ms"] <= audio_in["max_ms"]
    assert to_client["count"] == to_client["n"] >= 1  # the pong
    assert to_client["p99_ms"] is not None
