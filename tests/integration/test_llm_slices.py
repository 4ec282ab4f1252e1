"""Replies in slices (LLM_SCHEDULING) through the whole stack against the fake OpenAI-compatible
server over real HTTP: a second conversation's first piece is not queued behind the first
conversation's whole reply, and the first reply goes on where it stopped. Order of events and of
the requests the server saw is asserted, never how long anything took."""
from __future__ import annotations

import asyncio
import json
import time

from tests.conftest import make_settings
from tests.support.stack import run_stack
from tests.support.ws import collect_until, connect

LONG_REPLY = " ".join(["Here is a long answer."] + [f"Point {i} goes on for a while." for i in range(12)])


async def wait_for(condition, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_second_conversations_first_piece_goes_before_the_rest_of_a_long_reply(
    redis_url, redis_client, transcriber, voice, fake_llm
):
    settings = make_settings(redis_url, llm_scheduling=True, llm_first_slice_tokens=4, llm_slice_tokens=0)
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.02  # the long reply takes ~2 s: B asks well within it
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        first, _ = await connect(stack.ws_url)
        second, _ = await connect(stack.ws_url)
        async with first, second:
            await first.send(json.dumps({"type": "text.input", "text": "Tell me everything."}))
            # well past its first slice (4 tokens), into the rest of the reply
            await wait_for(lambda: sum(r.tokens_sent for r in fake_llm.streams) >= 10)
            await second.send(json.dumps({"type": "text.input", "text": "And briefly?"}))
            (events_1, audio_1), (events_2, audio_2) = await asyncio.gather(
                timed_until(first, "response.done"), timed_until(second, "response.done")
            )
            # the server saw: the long reply's first slice, its rest cut off; the second
            # conversation's first slice; then the long reply continued where it stopped
            streams = fake_llm.streams
            users = [s.messages[-1]["content"] for s in streams]
            assert users[:4] == ["Tell me everything.", "Tell me everything.", "And briefly?", "Tell me everything."]
            assert streams[0].completed and streams[0].max_tokens == 4  # a first slice
            assert not streams[1].completed  # closed early: preempted
            assert streams[2].completed and streams[2].max_tokens == 4
            continued = streams[3].prompt.split("<|im_start|>assistant\n")[-1]
            assert len(continued.split()) >= 10 and LONG_REPLY.startswith(continued)  # carries the text so far
            # at the clients: the second reply's first text came before the first reply was done
            # (published before its first slice gave the server back, so before the rest of the first)
            first_text_2 = next(t for t, e in events_2 if e["type"] == "response.text.delta")
            assert first_text_2 < events_1[-1][0]
            text_1 = events_1[-1][1]["text"]
            assert text_1 == LONG_REPLY  # nothing lost or repeated at the cut
            assert events_2[-1][1]["text"] == LONG_REPLY and audio_1 and audio_2


async def timed_until(ws, type_: str, timeout: float = 30.0):
    """Like `collect_until`, with the time each event and audio frame arrived."""
    events: list[tuple[float, dict]] = []
    audio: list[tuple[float, bytes]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            now = time.monotonic()
            if isinstance(frame, bytes):
                audio.append((now, frame))
                continue
            events.append((now, json.loads(frame)))
            if events[-1][1]["type"] == type_:
                return events, audio
