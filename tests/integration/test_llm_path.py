"""The LLM path through the whole stack: the output guard, retries, timeouts, and the pool left clean
(real sockets, real Redis, a fake OpenAI-compatible server that records when its client left)."""
from __future__ import annotations

import asyncio
import json
import logging

from shared.logging import ContextFilter
from tests.conftest import make_settings
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.stack import run_stack
from tests.support.ws import collect_until, connect
from voicepipe.embedded import free_port

# "forbidden plan" arrives split over three tokens; the server then stalls until its client leaves
BLOCKED_TOKENS = ["Sure", ", here", " is", " the", " forb", "idden", " pl", "an", " in", " detail", "."]


async def test_the_guard_blocks_a_term_split_across_tokens_and_closes_the_upstream_stream(
    redis_url, redis_client, transcriber, voice, fake_llm, caplog
):
    caplog.handler.addFilter(ContextFilter())
    settings = make_settings(redis_url, guard_blocked_terms=["Forbidden Plan", "secret"])
    fake_llm.tokens, fake_llm.stall_after = BLOCKED_TOKENS, 9
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        ws, _ = await connect(stack.ws_url, additional_headers={"X-Correlation-ID": "guard-1"})
        async with ws:
            with caplog.at_level(logging.INFO, logger="voicepipe.llm"):
                await ws.send(json.dumps({"type": "text.input", "text": "How do I do it?"}))
                events, _ = await collect_until(ws, "response.done")
                kinds = [e["type"] for e in events]
                assert kinds.index("response.blocked") < kinds.index("response.done") == len(kinds) - 1
                blocked = events[kinds.index("response.blocked")]
                assert blocked["turn_id"] == events[-1]["turn_id"] and blocked["reason"]
                text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
                assert text.rstrip() == "Sure, here is the" == events[-1]["text"]  # all before the term, none of it
                assert "forb" not in json.dumps(events).lower()
                # the server saw its client leave: it had stalled and would never have ended by itself
                record = fake_llm.streams[-1]
                await record.wait_ended(timeout=10)
                assert not record.completed
            lines = [r for r in caplog.records if r.getMessage() == "Connection closed after blocking streaming output"]
            assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].correlation_id == "guard-1"
            # the conversation stays usable
            fake_llm.tokens, fake_llm.stall_after = None, None
            await ws.send(json.dumps({"type": "text.input", "text": "Something else?"}))
            events, audio = await collect_until(ws, "response.done")
            assert events[-1]["text"] == fake_llm.reply and audio
            assert not any(e["type"] == "response.blocked" for e in events)


async def test_twenty_concurrent_blocked_streams_leave_the_pool_empty(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, guard_blocked_terms=["forbidden plan"])
    fake_llm.tokens, fake_llm.stall_after = BLOCKED_TOKENS, 9
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        sockets = [(await connect(stack.ws_url))[0] for _ in range(20)]
        try:
            for ws in sockets:
                await ws.send(json.dumps({"type": "text.input", "text": "Tell me the plan."}))
            results = await asyncio.gather(*(collect_until(ws, "response.done", timeout=60) for ws in sockets))
            for events, _ in results:
                assert [e["type"] for e in events][-2:] == ["response.blocked", "response.done"]
            for record in fake_llm.streams:
                await record.wait_ended(timeout=10)
            assert len(fake_llm.streams) == 20 and not any(r.completed for r in fake_llm.streams)
            chat = stack.workers["llm"].chat
            async with asyncio.timeout(10):
                while chat.open_streams or chat.pool_stats()["in_use"]:
                    await asyncio.sleep(0.01)
            assert stack.workers["llm"].resources()["upstream_streams"] == 0
        finally:
            for ws in sockets:
                await ws.close()


async def test_a_refused_connect_is_retried(redis_url, redis_client, transcriber, voice):
    port = free_port()
    settings = make_settings(redis_url, llm_retries=5, llm_retry_backoff_s=0.5)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=f"http://127.0.0.1:{port}/v1") as stack:
        ws, _ = await connect(stack.ws_url)
        async with ws:
            await ws.send(json.dumps({"type": "text.input", "text": "Are you there?"}))
            chat = stack.workers["llm"].chat
            async with asyncio.timeout(10):
                while chat.stats["retries"] < 1:  # the first connect was refused: nothing listens yet
                    await asyncio.sleep(0.01)
            with FakeLlmServer(FakeLlm(port=port)) as llm:
                events, audio = await collect_until(ws, "response.done")
        assert not any(e["type"] == "error" for e in events)
        assert events[-1]["text"] == llm.reply and audio


async def test_a_server_that_stalls_past_the_read_timeout_ends_the_turn_with_llm_timeout(
    redis_url, redis_client, transcriber, voice, fake_llm
):
    settings = make_settings(redis_url, llm_read_timeout_s=0.5)
    fake_llm.stall_after = 3
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        ws, _ = await connect(stack.ws_url)
        async with ws:
            await ws.send(json.dumps({"type": "text.input", "text": "Hello?"}))
            events, _ = await collect_until(ws, "response.done")
            errors = [e for e in events if e["type"] == "error"]
            assert [e["code"] for e in errors] == ["llm_timeout"] and errors[0]["message"]
            assert errors[0]["turn_id"] == events[-1]["turn_id"]
            await fake_llm.streams[-1].wait_ended(timeout=10)
            assert len(fake_llm.streams) == 1  # nothing is retried after the first token
            chat = stack.workers["llm"].chat
            async with asyncio.timeout(10):
                while chat.open_streams or chat.pool_stats()["in_use"]:
                    await asyncio.sleep(0.01)
