"""Per-conversation settings on the worker side, over real Redis with the real VAD and whisper (and a
fake LLM server): the turn detection a client chooses (`conversation.configured`), clearing its
input audio (`audio.clear`), its own instructions, and truncating the last reply
(`response.cancel` reason `truncated`). Each worker runs alone; the test plays its gateway on the
bus, so what the worker publishes is read as the gateway and the next stages would see it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared.bus import Bus, create_redis
from shared.channels import Names
from shared.config import Settings
from shared.messages import (
    AudioClear,
    AudioCommit,
    AudioIn,
    BusMessage,
    ConversationConfigured,
    ConversationOpened,
    IntrospectReply,
    IntrospectRequest,
    ResponseCancel,
    ResponseTextDone,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    TextInput,
    TranscriptFinal,
    TtsSpeak,
    TtsStop,
)
from shared.messages.codec import decode
from tests.conftest import make_settings
from tests.support.gated import Gated
from voicepipe.wavio import read_audio_16k_mono
from workers.llm_orchestrator.handler import LlmWorker
from workers.llm_orchestrator.llm_client import ChatClient
from workers.runtime import Worker
from workers.vad_stt.handler import VadSttWorker

FIXTURES = Path(__file__).parent.parent / "fixtures"
SPEECH = read_audio_16k_mono(FIXTURES / "hello.wav")
FRAME = 640  # 20 ms of 16 kHz PCM16
SILENCE = bytes(FRAME)
SPEECH_FRAMES = [SPEECH[i : i + FRAME].ljust(FRAME, b"\0") for i in range(0, len(SPEECH), FRAME)]
GATEWAY, VAD, LLM, TTS = "g-test", "v-test", "l-test", "t-test"
LONG_REPLY = " ".join(
    [
        "Paris is the capital of France, and it sits on the river Seine.",
        "It has been the heart of French life for more than a thousand years.",
        "Millions of people visit it every year to see its museums and its old streets.",
    ]
)


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class Driver:
    """Plays the gateway (and the other stages' inboxes) for one worker running alone."""

    def __init__(self, settings: Settings, worker: Worker, observer) -> None:
        self.settings = settings
        self.worker = worker
        self.names = Names.from_settings(settings)
        self.redis = observer
        self.bus = Bus(observer, "test-gateway")
        self.gateway_inbox = self.names.inbox("gateway", GATEWAY)
        self.llm_inbox = self.names.inbox("llm", LLM)
        self.tts_inbox = self.names.inbox("tts", TTS)
        self.heard: list[tuple[str, BusMessage]] = []
        self.clock = 0.0  # the gateway's receive time of the next frame

    async def open(self, cid: str) -> None:
        route = {"gateway": GATEWAY, "vad_stt": VAD, "llm": LLM, "tts": TTS, "connection_id": uuid.uuid4().hex,
                 "correlation_id": cid, self.worker.stage: self.worker.worker_id}
        await self.redis.hset(self.names.conversation(cid), mapping=route)  # the lease the worker checks
        async with asyncio.timeout(30):  # until the worker holds it (its reader may not be subscribed yet)
            while cid not in self.worker.conversation_ids():
                await self.bus.publish(self.worker.inbox, ConversationOpened(conversation_id=cid, **route))
                await asyncio.sleep(0.05)

    async def send(self, message: BusMessage) -> None:
        await self.bus.publish(self.worker.inbox, message)

    async def audio(self, cid: str, frames: list[bytes]) -> None:
        """Frames as the gateway forwards them, 20 ms apart on its clock (the VAD counts frames, so
        they need not be sent in real time)."""
        for pcm in frames:
            self.clock += 20
            await self.send(AudioIn(conversation_id=cid, received_ms=self.clock, pcm=pcm))

    async def commit(self, cid: str) -> float:
        self.clock += 20
        await self.send(AudioCommit(conversation_id=cid, received_ms=self.clock))
        return self.clock

    async def handled_so_far(self) -> None:
        """A barrier: the worker answers an introspection only after handling what was sent before it."""
        request_id = uuid.uuid4().hex
        request = IntrospectRequest(conversation_id="", request_id=request_id, reply_to=self.gateway_inbox)
        await self.bus.publish(self.names.control, request)
        await until(lambda: any(isinstance(m, IntrospectReply) and m.request_id == request_id for _, m in self.heard))

    def of(self, cid: str, kind: type, channel: str | None = None) -> list:
        channel = channel or self.gateway_inbox
        return [m for c, m in self.heard if c == channel and m.conversation_id == cid and isinstance(m, kind)]

    async def history(self, cid: str, length: int | None = None, timeout: float = 10.0) -> list[dict]:
        """The conversation's history as stored (once it has `length` messages, when given)."""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.redis.hget(self.names.history(cid), "messages")
                stored = json.loads(raw) if raw else []
                if length is None or len(stored) == length:
                    return stored
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def driving(settings: Settings, make: Callable[[object], Worker]) -> AsyncIterator[Driver]:
    client, observer = create_redis(settings.redis_url_or_default), create_redis(settings.redis_url_or_default)
    worker = make(client)
    driver = Driver(settings, worker, observer)
    pubsub = observer.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(driver.gateway_inbox, driver.llm_inbox, driver.tts_inbox, driver.names.tts_control)

    async def listen() -> None:
        while True:
            raw = await pubsub.get_message(timeout=1)
            if raw is not None:
                driver.heard.append((raw["channel"].decode(), decode(raw["data"])))

    listener = asyncio.create_task(listen())
    runner = asyncio.create_task(worker.run())
    try:
        yield driver
    finally:
        for task in (runner, listener):
            task.cancel()
        await asyncio.gather(runner, listener, return_exceptions=True)
        await pubsub.aclose()
        keys = [key async for key in observer.scan_iter(match=f"{settings.namespace}:*")]
        if keys:
            await observer.delete(*keys)
        await client.aclose()
        await observer.aclose()


# ---- the VAD/STT worker


async def test_a_manual_conversation_ends_its_utterance_on_commit_only_with_all_its_audio(redis_url, transcriber):
    settings = make_settings(redis_url)
    model = Gated(transcriber, "transcribe")  # records what whisper was given
    async with driving(settings, lambda client: VadSttWorker(settings, client, transcriber=model)) as gw:
        await gw.open("manual")
        await gw.send(ConversationConfigured(conversation_id="manual", turn_detection="manual"))
        frames = [SILENCE] * 10 + SPEECH_FRAMES + [SILENCE] * 50  # a second of silence after the speech
        await gw.audio("manual", frames)
        last_speech_ms = gw.clock - 50 * 20
        await gw.handled_so_far()
        assert len(gw.of("manual", SpeechStarted)) == 1  # with the first frame, silent as it was
        assert gw.of("manual", SpeechStopped) == []  # the silence ended nothing
        assert gw.of("manual", SpeechSustained) == []  # speech alone interrupts nothing
        assert gw.worker.busy("manual")
        committed_ms = await gw.commit("manual")
        await until(lambda: gw.of("manual", TranscriptFinal))
        (stopped,) = gw.of("manual", SpeechStopped)
        (final,) = gw.of("manual", TranscriptFinal)
        assert stopped.turn_id == final.turn_id == gw.of("manual", SpeechStarted)[0].turn_id
        assert stopped.decided_ms == committed_ms
        assert stopped.speech_end_ms <= last_speech_ms  # the last voiced frame, not the commit
        assert "how are you" in final.text.lower()
        assert [m.turn_id for m in gw.of("manual", TranscriptFinal, gw.llm_inbox)] == [final.turn_id]
        assert model.calls == [b"".join(frames)]  # all the audio since the last commit, nothing else
        # the next utterance is what comes after that commit, however quiet
        await gw.audio("manual", [SILENCE] * 5)
        await gw.commit("manual")
        await until(lambda: len(gw.of("manual", TranscriptFinal)) == 2)
        assert model.calls[-1] == SILENCE * 5
        assert len(gw.of("manual", SpeechStarted)) == 2


async def test_a_longer_end_silence_waits_longer_than_the_default(redis_url, transcriber):
    # the default's end silence fixed at 300 ms (no adaptive end of turn), whatever whisper says
    settings = make_settings(redis_url, vad_end_silence_min_ms=300, vad_end_silence_max_ms=300)
    assert settings.vad_end_silence_ms == 300
    async with driving(settings, lambda client: VadSttWorker(settings, client, transcriber=transcriber)) as gw:
        for cid in ("default", "patient"):
            await gw.open(cid)
        await gw.send(ConversationConfigured(conversation_id="patient", end_silence_ms=800))
        for cid in ("default", "patient"):
            await gw.audio(cid, [SILENCE] * 10 + SPEECH_FRAMES + [SILENCE] * 25)  # 500 ms of silence
        await gw.handled_so_far()
        assert gw.of("default", SpeechStopped)  # 300 ms of silence ended it
        assert gw.of("patient", SpeechStopped) == []
        await gw.audio("patient", [SILENCE] * 15)  # 800 ms in all
        await gw.handled_so_far()
        for cid, silence_ms in (("default", 300), ("patient", 800)):
            stops = gw.of(cid, SpeechStopped)
            assert stops and all(s.decided_ms - s.speech_end_ms == silence_ms for s in stops), (cid, stops)
        await until(lambda: gw.of("patient", TranscriptFinal) and gw.of("patient", TranscriptFinal)[-1].text)
        assert "how are you" in gw.of("patient", TranscriptFinal)[-1].text.lower()
        # None restores the setting
        await gw.send(ConversationConfigured(conversation_id="patient"))
        await gw.audio("patient", SPEECH_FRAMES + [SILENCE] * 25)
        await gw.handled_so_far()
        assert gw.of("patient", SpeechStopped)[-1].decided_ms - gw.of("patient", SpeechStopped)[-1].speech_end_ms == 300


async def test_clear_mid_utterance_leaves_no_transcript_and_nothing_held(redis_url, transcriber):
    settings = make_settings(redis_url, stt_speculate_after_ms=100)
    async with driving(settings, lambda client: VadSttWorker(settings, client, transcriber=transcriber)) as gw:
        worker: VadSttWorker = gw.worker
        await gw.open("cleared")
        await gw.handled_so_far()
        before = worker.holds("cleared")
        # the whole question, then a pause long enough for an early transcript, not for the end
        # (220 ms of silence: part of the recording's own, and one frame more)
        await gw.audio("cleared", [SILENCE] * 10 + SPEECH_FRAMES[:-4] + [SILENCE])
        await gw.handled_so_far()
        assert worker.conversations["cleared"].speculation is not None  # whisper got it early
        assert worker.holds("cleared")["buffered_audio_bytes"] > 0
        await gw.send(AudioClear(conversation_id="cleared"))
        await gw.handled_so_far()
        (started,) = gw.of("cleared", SpeechStarted)
        # the turn the gateway was told of ends at once, empty: the gateway drops it
        (stopped,) = gw.of("cleared", SpeechStopped)
        assert stopped.turn_id == started.turn_id
        assert [(m.turn_id, m.text) for m in gw.of("cleared", TranscriptFinal)] == [(started.turn_id, "")]
        await until(lambda: not worker.scheduler.busy)  # the early transcript, if it ran, is discarded
        await gw.handled_so_far()
        assert [m.text for m in gw.of("cleared", TranscriptFinal)] == [""]
        assert gw.of("cleared", TranscriptFinal, gw.llm_inbox) == []
        assert worker.conversations["cleared"].speculation is None
        assert worker.holds("cleared") == before
        # nothing of the cleared audio is left to join the next utterance
        await gw.audio("cleared", SPEECH_FRAMES[:5])  # too short to start speech on its own
        assert worker.holds("cleared")["buffered_audio_bytes"] <= 5 * FRAME
        await gw.audio("cleared", [SILENCE] * 30)
        await gw.handled_so_far()
        assert len(gw.of("cleared", SpeechStopped)) <= 2 and all(m.text == "" for m in gw.of("cleared", TranscriptFinal))


async def test_clear_in_a_manual_conversation_drops_everything_since_the_last_commit(redis_url, transcriber):
    settings = make_settings(redis_url)
    model = Gated(transcriber, "transcribe")
    async with driving(settings, lambda client: VadSttWorker(settings, client, transcriber=model)) as gw:
        await gw.open("manual")
        await gw.send(ConversationConfigured(conversation_id="manual", turn_detection="manual"))
        await gw.audio("manual", SPEECH_FRAMES)
        await gw.send(AudioClear(conversation_id="manual"))
        await gw.audio("manual", [SILENCE] * 5)
        await gw.commit("manual")
        await until(lambda: len(gw.of("manual", TranscriptFinal)) == 2)
        first, second = gw.of("manual", TranscriptFinal)
        assert first.text == "" and first.turn_id != second.turn_id
        assert model.calls == [SILENCE * 5]  # the cleared speech never reached whisper


# ---- the LLM orchestrator


def llm_worker(settings: Settings, fake_llm) -> Callable[[object], LlmWorker]:
    def make(client) -> LlmWorker:
        chat = ChatClient.from_settings(settings, base_url=fake_llm.base_url, model="fake")
        return LlmWorker(settings, client, chat=chat)

    return make


async def test_instructions_replace_the_system_prompt_until_cleared(redis_url, fake_llm):
    settings = make_settings(redis_url)
    async with driving(settings, llm_worker(settings, fake_llm)) as gw:
        await gw.open("c")
        pirate = "You are a pirate. Answer in one sentence."
        await gw.send(ConversationConfigured(conversation_id="c", instructions=pirate, turn_detection="manual"))
        await gw.send(TextInput(conversation_id="c", turn_id="t1", text="Where is Paris?"))
        await until(lambda: gw.of("c", ResponseTextDone))
        sent = fake_llm.streams[-1].messages
        assert sent[0] == {"role": "system", "content": pirate}
        assert [m["role"] for m in sent] == ["system", "user"]
        assert pirate not in json.dumps(await gw.history("c", 2))  # the conversation's setting, not its history
        await gw.send(ConversationConfigured(conversation_id="c"))
        await gw.send(TextInput(conversation_id="c", turn_id="t2", text="And Rome?"))
        await until(lambda: len(gw.of("c", ResponseTextDone)) == 2)
        sent = fake_llm.streams[-1].messages
        assert sent[0] == {"role": "system", "content": settings.system_prompt}
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]


async def test_a_truncate_of_the_last_finished_reply_cuts_its_history(redis_url, fake_llm):
    settings = make_settings(redis_url)
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.001
    async with driving(settings, llm_worker(settings, fake_llm)) as gw:
        await gw.open("c")
        await gw.send(TextInput(conversation_id="c", turn_id="a", text="Tell me about Paris."))
        await until(lambda: gw.of("c", ResponseTextDone))
        await gw.history("c", 2)
        pieces = [m.text for m in sorted(gw.of("c", TtsSpeak, gw.tts_inbox), key=lambda m: m.seq) if m.turn_id == "a"]
        assert len(pieces) >= 3
        # a newer reply is generating (its server stalls) while the client reports what it played of "a"
        fake_llm.stall_after = 2
        await gw.send(TextInput(conversation_id="c", turn_id="b", text="And Rome?"))
        await until(lambda: len(fake_llm.streams) == 2)
        heard_before = len(gw.heard)
        await gw.send(ResponseCancel(conversation_id="c", turn_id="a", reason="truncated", heard=1.5))
        await gw.handled_so_far()
        stored = await gw.history("c")
        assert [m["role"] for m in stored] == ["user", "assistant"]
        cut = stored[1]
        assert cut["note"] == "interrupted"
        second = pieces[1].split()
        assert cut["content"] == f"{pieces[0]} {' '.join(second[: round(len(second) / 2)])}"
        assert LONG_REPLY.startswith(cut["content"]) and len(cut["content"]) < len(LONG_REPLY)
        assert gw.worker.conversations["c"].history == stored
        # nobody is told: that reply is over everywhere else, and the newer one goes on
        assert [m for _, m in gw.heard[heard_before:] if not isinstance(m, IntrospectReply) and m.turn_id == "a"] == []
        assert gw.of("c", TtsStop, gw.names.tts_control) == []
        assert fake_llm.streams[1].ended is None
        # a truncate of an older reply, or an unknown one, changes nothing
        await gw.send(ResponseCancel(conversation_id="c", turn_id="zzz", reason="truncated", heard=0))
        await gw.handled_so_far()
        assert await gw.history("c") == stored
        # a truncate of the reply under way stops it, as a cancel does
        await gw.send(ResponseCancel(conversation_id="c", turn_id="b", reason="truncated", heard=0))
        await fake_llm.streams[1].wait_ended(timeout=10)
        await until(lambda: gw.of("c", TtsStop, gw.names.tts_control))
        stored = await gw.history("c", 4)
        assert stored[:2] == [stored[0], cut] and stored[2] == {"role": "user", "content": "And Rome?"}
        assert stored[3]["note"] == "interrupted"
        # "a" is no longer the last reply: a late truncate of it is ignored
        await gw.send(ResponseCancel(conversation_id="c", turn_id="a", reason="truncated", heard=0))
        await gw.handled_so_far()
        assert await gw.history("c") == stored


def trimmed_frames(name: str) -> list[bytes]:
    """A recording's 20 ms frames up to its last voiced one (its own trailing silence cut off), so
    the silence a test sends is all the silence the VAD hears."""
    import webrtcvad

    vad = webrtcvad.Vad(make_settings("redis://unused").vad_aggressiveness)
    pcm = read_audio_16k_mono(FIXTURES / name)
    frames = [pcm[i : i + FRAME].ljust(FRAME, b"\0") for i in range(0, len(pcm), FRAME)]
    last = max(i for i, frame in enumerate(frames) if vad.is_speech(frame, 16000))
    return frames[: last + 1]


async def test_a_finished_question_ends_sooner_and_a_trailing_and_waits_longer(redis_url, transcriber):
    """Adaptive end of turn with the real VAD and whisper: the early transcript of the pause moves
    the end silence (default 300 ms) down for "What is the capital ...?" and up for "... and"."""
    settings = make_settings(redis_url)
    assert (settings.vad_end_silence_min_ms, settings.vad_end_silence_ms, settings.vad_end_silence_max_ms) == (250, 300, 700)
    async with driving(settings, lambda client: VadSttWorker(settings, client, transcriber=transcriber)) as gw:
        worker: VadSttWorker = gw.worker
        for cid in ("question", "open"):
            await gw.open(cid)
        # 280 ms of silence after the question: the setting's 300 ms would never end it
        await gw.audio("question", [SILENCE] * 10 + trimmed_frames("capital.wav") + [SILENCE] * 14)
        await until(lambda: gw.of("question", TranscriptFinal))
        (stopped,) = gw.of("question", SpeechStopped)
        assert stopped.decided_ms - stopped.speech_end_ms <= 280
        assert "capital" in gw.of("question", TranscriptFinal)[0].text.lower()
        assert worker.end_adjusted["shortened"] == 1
        page = {(s.name, s.labels.get("direction")): s.value for f in text_string_to_metric_families(worker.metrics.render().decode())
                for s in f.samples}
        assert page[("voicepipe_vad_end_adjusted_total", "shortened")] == 1  # on the worker's /metrics
        # "... and": 400 ms of silence end nothing, once the early transcript has been heard
        await gw.audio("open", [SILENCE] * 10 + trimmed_frames("trailing_and.wav") + [SILENCE] * 10)
        await until(lambda: worker.end_adjusted["extended"] == 1)
        await gw.audio("open", [SILENCE] * 10)
        await gw.handled_so_far()
        assert gw.of("open", SpeechStopped) == []
        await gw.audio("open", [SILENCE] * 20)  # 800 ms in all
        await gw.handled_so_far()
        (stopped,) = gw.of("open", SpeechStopped)
        assert 600 <= stopped.decided_ms - stopped.speech_end_ms <= 700
        await until(lambda: gw.of("open", TranscriptFinal))
        assert gw.of("open", TranscriptFinal)[0].text.lower().rstrip(". ").endswith("and")
