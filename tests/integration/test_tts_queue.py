"""The TTS speaker against a real Redis, with the null voice: pieces that arrive while the speaker
is finishing (waiting for its speaking mark, or clearing it) are still spoken."""
from __future__ import annotations

import asyncio
import uuid

from shared.bus import create_redis
from shared.messages import TtsAudioDone, TtsEnd, TtsSpeak
from shared.messages.codec import decode
from workers.runtime import Route
from workers.tts.handler import TtsWorker


async def test_a_turn_queued_while_the_speaker_clears_its_mark_is_spoken(settings, redis_client):
    settings = settings.model_copy(update={"null_mode": True})
    client = create_redis(settings.redis_url_or_default)
    worker = TtsWorker(settings, client)
    await worker.load()
    cid = str(uuid.uuid4())
    route = Route(conversation_id=cid, gateway="g-test", vad_stt="v-test", llm="l-test", tts=worker.worker_id, correlation_id="c", connection_id="s")
    await worker.prepare(cid, route)
    gateway = redis_client.pubsub(ignore_subscribe_messages=True)
    await gateway.subscribe(worker.names.inbox("gateway", "g-test"))

    def turn(turn_id: str) -> list:
        envelope = {"conversation_id": cid, "correlation_id": "c", "turn_id": turn_id}
        return [TtsSpeak(text="Hello there.", seq=0, **envelope), TtsEnd(sentences=1, **envelope)]

    # the next turn reaches the reader (a task of its own, as the bus reader is) just while the
    # speaker, done with the first, clears its mark; the mark is cleared once the piece is queued
    clear_mark = client.delete
    second = turn("second")
    readers: list[asyncio.Task] = []

    async def read(messages: list) -> None:
        for message in messages:
            await worker.handle("inbox", message)

    async def delete(*keys):
        if keys == (worker.names.tts_active(cid),) and second:
            readers.append(asyncio.create_task(read([second.pop(0), second.pop(0)])))
            async with asyncio.timeout(5):
                while not any(item.turn_id == "second" for item in worker.conversations[cid].queue):
                    await asyncio.sleep(0)
        return await clear_mark(*keys)

    client.delete = delete
    try:
        for message in turn("first"):
            await worker.handle("inbox", message)
        done: list[str] = []
        async with asyncio.timeout(10):
            while done != ["first", "second"]:
                raw = await gateway.get_message(timeout=1)
                if raw is not None:
                    message = decode(raw["data"])
                    if isinstance(message, TtsAudioDone):
                        done.append(message.turn_id)
        assert not second  # the second turn did arrive while the mark was being cleared
        await asyncio.gather(*readers)
    finally:
        await worker.close_conversation(cid)
        worker.scheduler.close()
        await gateway.aclose()
        await client.aclose()
