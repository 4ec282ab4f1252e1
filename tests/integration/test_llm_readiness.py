"""`/readyz` says whether the LLM answers: a real fake LLM server stopped and started again.

The gateway never talks to the LLM server; the orchestrator checks it (workers/llm_orchestrator/
readiness.py) and reports `llm_ok` in its heartbeat, which the gateway reads."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import make_settings
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.stack import run_stack
from tests.support.ws import collect_until, connect


async def readyz_until(url: str, status: int, timeout: float = 10.0) -> dict:
    """Poll /readyz until it answers `status`; returns its body."""
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
        while True:
            answer = await client.get(f"{url}/readyz")
            if answer.status_code == status:
                return answer.json()
            await asyncio.sleep(0.05)


async def typed_turn(ws_url: str, text: str) -> list[dict]:
    ws, _ = await connect(ws_url)
    try:
        await ws.send(json.dumps({"type": "text.input", "text": text}))
        events, _ = await collect_until(ws, "response.done", timeout=20)
        return events
    finally:
        await ws.close()


async def test_readyz_follows_the_llm_server_going_away_and_coming_back(redis_url, redis_client, transcriber, voice):
    """Checked periodically: no turn is needed for /readyz to notice."""
    llm = FakeLlm()
    settings = make_settings(redis_url, llm_check_interval_s=0.3)
    server = FakeLlmServer(llm)
    server.__enter__()
    try:
        async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=llm.base_url) as stack:
            assert (await readyz_until(stack.http_url, 200))["status"] == "ready"
            server.__exit__(None, None, None)
            body = await readyz_until(stack.http_url, 503)
            assert body["missing"] == ["llm_server"] and body["detail"] == "llm unreachable", body
            assert body["workers"] == {"vad_stt": 1, "llm": 1, "tts": 1}
            assert "Error" not in json.dumps(body) and "127.0.0.1" not in json.dumps(body)  # no exception text

            server = FakeLlmServer(llm)  # the same port
            server.__enter__()
            assert (await readyz_until(stack.http_url, 200))["status"] == "ready"
            events = await typed_turn(stack.ws_url, "Hello again")
            assert events[-1]["text"] == llm.reply
    finally:
        server.__exit__(None, None, None)


async def test_a_failed_reply_makes_the_orchestrator_check_at_once(redis_url, redis_client, transcriber, voice):
    """With a periodic check far away, only the failed turn can have made /readyz say 503 now."""
    llm = FakeLlm()
    settings = make_settings(redis_url, llm_check_interval_s=3600, llm_retries=0, llm_connect_timeout_s=1.0)
    server = FakeLlmServer(llm)
    server.__enter__()
    try:
        async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=llm.base_url) as stack:
            readiness = stack.workers["llm"].llm_readiness
            assert readiness.ok is True and readiness.checks == 1
            server.__exit__(None, None, None)
            events = await typed_turn(stack.ws_url, "Are you there?")
            assert [e["code"] for e in events if e["type"] == "error"] == ["llm_unavailable"], events
            body = await readyz_until(stack.http_url, 503, timeout=5)
            assert body["missing"] == ["llm_server"], body

            server = FakeLlmServer(llm)
            server.__enter__()
            await readyz_until(stack.http_url, 200, timeout=10)  # rechecked every second while down
            events = await typed_turn(stack.ws_url, "Now?")
            assert events[-1]["text"] == llm.reply
    finally:
        server.__exit__(None, None, None)
