"""Fairness between clients over real Redis and the real models: what one conversation queues is
bounded, and the models are shared round-robin. The models sit behind a gate the test closes, so
the queues it asserts on exist for sure; every wait is a positive marker with a generous timeout,
and the order is read from the schedulers' own record, never from the clock."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

from shared.bus import Bus, create_redis
from shared.channels import Names
from shared.fair import FairScheduler
from shared.messages import (
    AudioCommit,
    AudioIn,
    ConversationOpened,
    IntrospectReply,
    IntrospectRequest,
    SpeechStopped,
    TranscriptFinal,
)
from shared.messages.codec import decode
from tests.conftest import make_settings
from tests.support.gated import Gated
from tests.support.stack import run_stack
from tests.support.ws import collect_until, connect
from voicepipe.wavio import read_audio_16k_mono
from workers.vad_stt.handler import VadSttWorker

FIXTURES = Path(__file__).parent.parent / "fixtures"
SPEECH = read_audio_16k_mono(FIXTURES / "hello.wav")
QUESTIONS = {name: read_audio_16k_mono(FIXTURES / f"{name}.wav") for name in ("hello", "capital", "moon")}
FRAME = 640
SILENCE = bytes(FRAME)


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def windows(scheduler: FairScheduler, key: str) -> list[list[str]]:
    """For each job of `key` the model served: the keys it served between that job's queueing and
    its dispatch, in order (the scheduler's own record)."""
    served = {s.dispatched: s for s in scheduler.served}
    found = []
    for s in served.values():
        if s.key == key:
            assert all(i in served for i in range(s.queued_at, s.dispatched)), "the record was cut"
            found.append([served[i].key for i in range(s.queued_at, s.dispatched)])
    return found


def assert_round_robin(scheduler: FairScheduler, key: str) -> list[list[str]]:
    """Between two dispatches of `key` (and before its first), no other key is served twice; while
    a non-urgent job of `key` waits, other keys' urgent jobs (a reply's first piece) may go first."""
    found = windows(scheduler, key)
    assert found, f"no job of {key} was served"
    served = {s.dispatched: s for s in scheduler.served}
    for job in (s for s in served.values() if s.key == key):
        window = [
            served[i].key for i in range(job.queued_at, job.dispatched) if job.urgent or not served[i].urgent
        ]
        segment: list[str] = []
        for served_key in [*window, key]:
            if served_key == key:
                assert len(segment) == len(set(segment)), f"{key} waited while one key was served twice: {window}"
                segment = []
            else:
                segment.append(served_key)
    return found


# ---- bounded transcription work per conversation (the VAD/STT worker alone, over real Redis)


async def test_an_utterance_end_merges_into_the_conversations_waiting_transcription(redis_url, transcriber):
    settings = make_settings(redis_url)
    names = Names.from_settings(settings)
    client, observer = create_redis(redis_url), create_redis(redis_url)
    model = Gated(transcriber, "transcribe")
    worker = VadSttWorker(settings, client, transcriber=model)
    bus = Bus(observer, "test-gateway")
    gateway_inbox, llm_inbox = names.inbox("gateway", "g-test"), names.inbox("llm", "l-test")
    pubsub = observer.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(gateway_inbox, llm_inbox)
    heard: list[tuple[str, object]] = []

    async def listen() -> None:
        while True:
            raw = await pubsub.get_message(timeout=1)
            if raw is not None:
                heard.append((raw["channel"].decode(), decode(raw["data"])))

    async def open_conversation(cid: str) -> None:
        route = {"gateway": "g-test", "vad_stt": worker.worker_id, "llm": "l-test", "tts": "t-test",
                 "connection_id": uuid.uuid4().hex, "correlation_id": cid}
        await observer.hset(names.conversation(cid), mapping=route)  # the lease the sweep checks
        async with asyncio.timeout(30):  # until the worker holds it (its reader may not be subscribed yet)
            while cid not in worker.conversations:
                await bus.publish(worker.inbox, ConversationOpened(conversation_id=cid, **route))
                await asyncio.sleep(0.05)

    async def handled_so_far() -> None:
        """A barrier: the worker answers an introspection only after handling what was sent before it."""
        request_id = uuid.uuid4().hex
        await bus.publish(names.control, IntrospectRequest(conversation_id="", request_id=request_id, reply_to=gateway_inbox))
        await until(lambda: any(isinstance(m, IntrospectReply) and m.request_id == request_id for _, m in heard))

    clock = [0.0]

    async def speak(cid: str, speech: bytes = SPEECH) -> None:
        """One utterance at its real timing (the VAD reads the receive times), ended by a commit."""
        for pcm in [SILENCE] * 10 + [speech[i : i + FRAME].ljust(FRAME, b"\0") for i in range(0, len(speech), FRAME)]:
            clock[0] += 20
            await bus.publish(worker.inbox, AudioIn(conversation_id=cid, received_ms=clock[0], pcm=pcm))
        clock[0] += 20
        await bus.publish(worker.inbox, AudioCommit(conversation_id=cid, received_ms=clock[0]))

    def of(cid: str, kind: type) -> list:
        return [m for channel, m in heard if channel == gateway_inbox and m.conversation_id == cid and isinstance(m, kind)]

    listener = asyncio.create_task(listen())
    runner = asyncio.create_task(worker.run())
    try:
        await open_conversation("busy")
        await open_conversation("merged")
        model.close()
        await speak("busy")
        await model.held()  # whisper is busy with "busy" and stays so until the gate opens
        for speech in QUESTIONS.values():
            await speak("merged", speech)
        await handled_so_far()
        turns = [m.turn_id for m in of("merged", SpeechStopped)]
        assert len(turns) >= 3
        # every turn but the last was superseded at once: an empty transcript, nothing waits for it
        assert [(m.turn_id, m.text) for m in of("merged", TranscriptFinal)] == [(t, "") for t in turns[:-1]]
        assert worker.scheduler.waiting("merged") == 1  # all the utterances, one waiting job
        assert worker.holds("merged")["queued_transcriptions"] == 1
        model.open()
        await until(lambda: len(of("merged", TranscriptFinal)) == len(turns))
        final = of("merged", TranscriptFinal)[-1]
        assert final.turn_id == turns[-1]
        assert all(words in final.text.lower() for words in ("how are you", "capital", "moon")), final.text  # no words lost
        assert [m.turn_id for channel, m in heard if channel == llm_inbox and m.conversation_id == "merged"] == [turns[-1]]
        assert [s.key for s in worker.scheduler.served].count("merged") == 1  # one whisper run for them all
    finally:
        model.open()
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()
        keys = [key async for key in observer.scan_iter(match=f"{settings.namespace}:*")]
        if keys:
            await observer.delete(*keys)
        await client.aclose()
        await observer.aclose()


# ---- round-robin between conversations through the whole pipeline


class NoisyClient:
    """A conversation that, again and again, speaks an utterance ended by a commit, then types a
    turn and waits until that reply is over (so its own replies do not interrupt each other)."""

    WATCHED = ("speech.stopped", "response.done", "response.interrupted")

    def __init__(self, url: str) -> None:
        self.url = url
        self.conversation_id = ""
        self.events = asyncio.Queue[str]()
        self.turns = 0

    async def run(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        ws, started = await connect(self.url)
        self.conversation_id = started["conversation_id"]
        ready.set()
        reader = asyncio.create_task(self._read(ws))
        try:
            while not stop.is_set():
                for i in range(0, len(SPEECH), FRAME):
                    await ws.send(SPEECH[i : i + FRAME].ljust(FRAME, b"\0"))
                await ws.send(json.dumps({"type": "input_audio.commit"}))
                await self._next("speech.stopped")
                await ws.send(json.dumps({"type": "text.input", "text": f"Tell me a story, part {self.turns}."}))
                await self._next("response.done", "response.interrupted")
                self.turns += 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await ws.close()

    async def _next(self, *types: str) -> None:
        async with asyncio.timeout(120):  # generous: while the test holds the models, this waits
            while await self.events.get() not in types:
                pass

    async def _read(self, ws) -> None:
        async for frame in ws:  # drain everything, or the gateway closes a client that does not read
            if isinstance(frame, str) and (kind := json.loads(frame)["type"]) in self.WATCHED:
                self.events.put_nowait(kind)


async def test_a_fourth_conversation_is_served_round_robin_while_three_flood_the_models(
    redis_url, redis_client, transcriber, voice, fake_llm
):
    settings = make_settings(redis_url)
    whisper, piper = Gated(transcriber, "transcribe"), Gated(voice, "synthesize")
    async with run_stack(settings, transcriber=whisper, voice=piper, llm_base_url=fake_llm.base_url) as stack:
        stt, tts = stack.workers["vad_stt"].scheduler, stack.workers["tts"].scheduler
        whisper.close()
        piper.close()
        stop = asyncio.Event()
        noisy = [NoisyClient(stack.ws_url) for _ in range(3)]
        ready = [asyncio.Event() for _ in noisy]
        loops = [asyncio.create_task(c.run(stop, r)) for c, r in zip(noisy, ready)]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
            loud = {c.conversation_id for c in noisy}
            # positive markers: both models are held by a noisy job, and every noisy conversation
            # has work queued or under way on both
            await whisper.held()
            await piper.held()
            # each has a transcription and a piece of speech queued or under way, and they stay so
            # while the models are held: a newer utterance merges into the waiting transcription,
            # and a noisy client types its next turn only once its reply is over
            audio = stack.workers["vad_stt"].conversations
            await until(lambda: all(audio[k].pending and (audio[k].pending.mergeable or stt.running == k) for k in loud), 60)
            await until(lambda: all(tts.waiting(k) or tts.running == k for k in loud), 60)

            ws, started = await connect(stack.ws_url)
            quiet = started["conversation_id"]
            async with ws:
                for i in range(0, len(SPEECH), FRAME):
                    await ws.send(SPEECH[i : i + FRAME].ljust(FRAME, b"\0"))
                await ws.send(json.dumps({"type": "input_audio.commit"}))
                await until(lambda: stt.waiting(quiet) >= 1)  # queued behind the flood
                whisper.open()
                events, _ = await collect_until(ws, "transcript.final", timeout=120)
                assert "how are you" in events[-1]["text"].lower()
                await until(lambda: tts.waiting(quiet) >= 1, timeout=120)  # its first piece, behind the flood
                piper.open()
                events, audio = await collect_until(ws, "response.done", timeout=120)
            assert events[-1]["text"] and audio
        finally:
            whisper.open()
            piper.open()
            stop.set()
            results = await asyncio.wait_for(asyncio.gather(*loops, return_exceptions=True), 120)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert all(c.turns >= 1 for c in noisy)
        stt_windows = assert_round_robin(stt, quiet)
        tts_windows = assert_round_robin(tts, quiet)
        # it waited for the two other conversations' queued jobs (the third was under way), each once
        assert any(len(set(w) & loud) >= 2 for w in stt_windows), stt_windows
        assert any(len(set(w) & loud) >= 2 for w in tts_windows), tts_windows
