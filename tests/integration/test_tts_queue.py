"""The TTS speaker against a real Redis, with the null voice: pieces that arrive while the speaker
is finishing (waiting for its speaking mark, or clearing it) are still spoken; a reply's later
pieces are rendered as its playback needs them, not sooner (and at once when draining), and a
reply stopped meanwhile is not rendered to its end."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from shared.bus import create_redis
from shared.messages import TtsAudio, TtsAudioDone, TtsEnd, TtsSpeak, TtsStop
from shared.messages.codec import decode
from workers.runtime import Route
from workers.tts.handler import TtsWorker

# the null voice speaks 60 ms a character: these pieces last 0.6 s, 6 s and 0.6 s
PIECES = ["Yes, hello", "x" * 100, "Goodbye. "]
PIECE_S = [len(text) * 0.06 for text in PIECES]


async def speech_worker(settings, lead_s: float = 0.0) -> tuple[TtsWorker, str]:
    settings = settings.model_copy(update={"null_mode": True, "tts_lead_s": lead_s})
    worker = TtsWorker(settings, create_redis(settings.redis_url_or_default))
    await worker.load()
    cid = str(uuid.uuid4())
    route = Route(conversation_id=cid, gateway="g-test", vad_stt="v-test", llm="l-test", tts=worker.worker_id, correlation_id="c", connection_id="s")
    await worker.prepare(cid, route)
    return worker, cid


async def speak(worker: TtsWorker, cid: str, turn_id: str, pieces: list[str]) -> None:
    envelope = {"conversation_id": cid, "correlation_id": "c", "turn_id": turn_id}
    for seq, text in enumerate(pieces):
        await worker.handle("inbox", TtsSpeak(text=text, seq=seq, **envelope))
    await worker.handle("inbox", TtsEnd(sentences=len(pieces), **envelope))


class GatewayInbox:
    """What the worker sends the gateway, each with when it arrived (time.monotonic())."""

    def __init__(self, redis_client, worker: TtsWorker) -> None:
        self.pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        self.channel = worker.names.inbox("gateway", "g-test")

    async def __aenter__(self) -> "GatewayInbox":
        await self.pubsub.subscribe(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pubsub.aclose()

    async def until(self, last) -> list[tuple[float, object]]:
        """Everything up to the first message `last` is true of."""
        received = []
        while True:
            raw = await self.pubsub.get_message(timeout=1)
            if raw is not None:
                received.append((time.monotonic(), message := decode(raw["data"])))
                if last(message):
                    return received

    async def until_done(self, turn_id: str) -> list[tuple[float, object]]:
        return await self.until(lambda m: isinstance(m, TtsAudioDone) and m.turn_id == turn_id)


@contextlib.asynccontextmanager
async def started_speaking(redis_client, worker: TtsWorker, cid: str, pieces: list[str]):
    """Speak `pieces` as turn "t1" and wait until its second piece's audio went out: the inbox
    (subscribed before) and what it got so far."""
    async with GatewayInbox(redis_client, worker) as inbox:
        await speak(worker, cid, "t1", pieces)
        async with asyncio.timeout(30):
            received = await inbox.until(lambda m: isinstance(m, TtsAudio) and m.piece == 1)
        yield inbox, received


async def close(worker: TtsWorker, cid: str) -> None:
    await worker.close_conversation(cid)
    worker.scheduler.close()
    await worker.redis.aclose()


async def test_a_turn_queued_while_the_speaker_clears_its_mark_is_spoken(settings, redis_client):
    worker, cid = await speech_worker(settings)
    client = worker.redis

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
        async with GatewayInbox(redis_client, worker) as inbox:
            for message in turn("first"):
                await worker.handle("inbox", message)
            async with asyncio.timeout(10):
                received = await inbox.until_done("second")
        assert [m.turn_id for _, m in received if isinstance(m, TtsAudioDone)] == ["first", "second"]
        assert not second  # the second turn did arrive while the mark was being cleared
        await asyncio.gather(*readers)
    finally:
        client.delete = clear_mark
        await close(worker, cid)


def first_audio(received: list[tuple[float, object]], turn_id: str) -> dict[int, float]:
    """piece -> when its first chunk arrived"""
    firsts: dict[int, float] = {}
    for at, message in received:
        if isinstance(message, TtsAudio) and message.turn_id == turn_id:
            firsts.setdefault(message.piece, at)
    return firsts


async def test_a_replys_later_pieces_are_rendered_as_its_playback_needs_them(settings, redis_client):
    lead = 0.5
    worker, cid = await speech_worker(settings, lead)
    try:
        async with GatewayInbox(redis_client, worker) as inbox:
            await speak(worker, cid, "t1", PIECES)
            async with asyncio.timeout(30):
                received = await inbox.until_done("t1")
        firsts = first_audio(received, "t1")
        assert sorted(firsts) == [0, 1, 2]
        # the second piece is due while the first plays; the third only once less than `lead` of
        # the first two is left to play (a lower bound: a slow machine only makes it later; the
        # margin covers the first piece's own trip through Redis being slower than the third's)
        assert firsts[2] - firsts[0] >= PIECE_S[0] + PIECE_S[1] - lead - 0.3
        assert [s.label for s in worker.scheduler.served].count("speak:t1") == 3
    finally:
        await close(worker, cid)


async def test_a_reply_stopped_while_it_plays_is_not_rendered_to_its_end(settings, redis_client):
    worker, cid = await speech_worker(settings, 0.5)
    try:
        async with started_speaking(redis_client, worker, cid, PIECES) as (inbox, received), asyncio.timeout(30):
            await worker.handle("control", TtsStop(conversation_id=cid, correlation_id="c", turn_id="t1"))
            await speak(worker, cid, "t2", ["Next."])  # its end is the marker that t1 sent nothing more
            received += await inbox.until_done("t2")
        assert sorted(first_audio(received, "t1")) == [0, 1]
        assert sorted(first_audio(received, "t2")) == [0]
        assert not [m for _, m in received if isinstance(m, TtsAudioDone) and m.turn_id == "t1"]
        assert [s.label for s in worker.scheduler.served].count("speak:t1") == 2  # the third never rendered
    finally:
        await close(worker, cid)


async def test_a_draining_worker_renders_the_rest_of_a_reply_at_once(settings, redis_client):
    pieces = ["Yes, hello", "x" * 400, "Goodbye."]  # the third would be due 24 s after the first
    worker, cid = await speech_worker(settings, 0.5)
    try:
        async with started_speaking(redis_client, worker, cid, pieces) as (inbox, received):
            worker.request_drain()
            async with asyncio.timeout(15):  # far sooner than its pace would have sent it
                received += await inbox.until_done("t1")
        assert sorted(first_audio(received, "t1")) == [0, 1, 2]
    finally:
        await close(worker, cid)
