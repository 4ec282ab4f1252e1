"""Null engines with a compute time serve one request at a time per process, as a loaded model does
(bench/scaling.py relies on it). Only lower bounds on time: a busy machine can only add to them."""
from __future__ import annotations

import asyncio
import time

from workers.null import NULL_REPLY, NULL_TRANSCRIPT, NullChat, NullTranscriber, NullVoice


async def test_null_chat_requests_queue_behind_each_other():
    chat = NullChat(compute_s=0.1)

    async def reply() -> tuple[str, float]:
        text = "".join([delta async for delta in chat.stream_chat([])])
        return text, time.monotonic()

    started = time.monotonic()
    (first, first_at), (second, second_at) = await asyncio.gather(reply(), reply())
    assert first == second == NULL_REPLY
    assert max(first_at, second_at) - started >= 0.2  # the second waited for the first's compute
    assert chat.stats["requests"] == 2


def test_null_transcriber_and_voice_take_their_compute_time():
    started = time.monotonic()
    assert NullTranscriber(compute_s=0.05).transcribe(b"\0\0") == NULL_TRANSCRIPT
    assert len(NullVoice(compute_s=0.05).synthesize("Hi.")) == 22050 * 2 * 60 * 3 // 1000
    assert time.monotonic() - started >= 0.1
    assert NullTranscriber().transcribe(b"") == NULL_TRANSCRIPT  # instant by default
