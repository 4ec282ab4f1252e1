"""Speculative replies over real sockets, real Redis, the real VAD, whisper and piper (a fake LLM
server): the reply starts on the pause's early transcript, before the end of the turn is decided,
and nothing of it reaches the client, the bus or the history unless the turn ends with the same
words. The stack here ends a turn after a fixed second of silence (no adaptive end), so there is
always time to speculate; each test waits for a positive marker of the speculation (the LLM asked,
or TTS holding audio) instead of hoping for it."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.bus import create_redis
from shared.messages import (
    ResponseTextDelta,
    ResponseTextDone,
    TranscriptEarly,
    TranscriptFinal,
    TranscriptWithdrawn,
    TtsAudio,
    TtsAudioDone,
    TtsAudioStarted,
    TtsEnd,
    TtsRelease,
    TtsSpeak,
    TtsStop,
)
from tests.conftest import make_settings
from tests.integration.test_conversation_settings import driving, llm_worker
from tests.support.stack import run_stack
from voicepipe.embedded import free_port
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono
from workers.tts.handler import TtsWorker

FIXTURES = Path(__file__).parent.parent / "fixtures"
END_SILENCE_MS = 1000  # fixed: the early transcript (100 ms into the pause) always comes well before the end


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def spec_settings(redis_url: str, **overrides):
    return make_settings(
        redis_url,
        vad_end_silence_ms=END_SILENCE_MS,
        vad_end_silence_min_ms=END_SILENCE_MS,
        vad_end_silence_max_ms=END_SILENCE_MS,
        **overrides,
    )


@pytest.fixture
async def bus_log(redis_url):
    """Every message published under a test's namespace, raw, from the moment it starts."""
    seen: list[bytes] = []
    client = create_redis(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def start(namespace: str) -> list[bytes]:
        await pubsub.psubscribe(f"{namespace}:*")

        async def listen() -> None:
            while True:
                raw = await pubsub.get_message(timeout=1)
                if raw is not None:
                    seen.append(raw["data"])

        tasks.append(asyncio.create_task(listen()))
        return seen

    tasks: list[asyncio.Task] = []
    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pubsub.aclose()
    await client.aclose()


async def speak(client: VoiceClient, name: str, trailing_silence_s: float) -> None:
    await client.send_speech(read_audio_16k_mono(FIXTURES / name), realtime=True, trailing_silence_s=trailing_silence_s)


async def stored_history(settings, cid: str) -> list[dict]:
    client = create_redis(settings.redis_url_or_default)
    try:
        raw = await client.hget(f"{settings.namespace}:conv:{cid}:history", "messages")
        return json.loads(raw) if raw else []
    finally:
        await client.aclose()


def held_audio(stack, cid: str) -> bool:
    conv = stack.workers["tts"].conversations.get(cid)
    return conv is not None and any(turn.held for turn in conv.turns.values())


async def test_a_confirmed_speculation_is_heard_only_after_the_turn_ends_and_is_kept_once(
    redis_url, transcriber, voice, fake_llm
):
    settings = spec_settings(redis_url)
    fake_llm.echo = True
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with VoiceClient(stack.ws_url) as client:
            rec = client.record()
            try:
                cid = client.conversation_id
                await speak(client, "capital.wav", trailing_silence_s=0.0)  # and the file's own short silence
                # the reply is ready, its first audio rendered and held in TTS, while the turn is still open
                await until(lambda: held_audio(stack, cid))
                await client.send_json({"type": "ping"})
                await rec.wait_event("pong")
                assert not rec.events("speech.stopped") and not rec.events("response.text.delta")
                assert rec.audio_frames(0) == 0
                await client.send_speech(b"", trailing_silence_s=1.5)  # the rest of the end-of-turn silence
                done = await rec.wait_event("response.done")
            finally:
                await rec.aclose()
        stopped = next(i for i, (_, f) in enumerate(rec.frames) if isinstance(f, dict) and f["type"] == "speech.stopped")
        first_delta = next(i for i, (_, f) in enumerate(rec.frames) if isinstance(f, dict) and f["type"] == "response.text.delta")
        first_audio = next(i for i, (_, f) in enumerate(rec.frames) if isinstance(f, bytes))
        assert stopped < first_delta and stopped < first_audio  # released only after the decision
        final = rec.events("transcript.final")[0]["text"]
        assert "capital" in final.lower()
        assert done["text"] == fake_llm.reply_for([{"role": "user", "content": final}])
        assert done["diagnostics"]["speculative"] is True
        assert done["diagnostics"]["audio_held_ms"] > 0
        assert len(rec.events("response.audio.started")) == 1 and rec.events("response.audio.done")
        assert len(fake_llm.streams) == 1  # the speculation was the reply: nothing asked twice
        llm = stack.workers["llm"]
        assert llm.speculations == {"started": 1, "confirmed": 1, "wasted": 0}
        assert await stored_history(settings, cid) == [
            {"role": "user", "content": final},
            {"role": "assistant", "content": done["text"]},
        ]
        tts = stack.workers["tts"].conversations.get(cid)
        assert tts is None or not tts.turns  # nothing left held


async def test_a_speculation_confirmed_before_its_first_piece_is_spoken_as_the_users_turn(redis_url, transcriber, voice, fake_llm):
    settings = spec_settings(redis_url)
    fake_llm.reply = "Paris is the capital and the largest city of France."
    fake_llm.token_delay_s = 0.6  # the turn ends long before the first piece (three words) exists
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with VoiceClient(stack.ws_url) as client:
            rec = client.record()
            try:
                cid = client.conversation_id
                await speak(client, "capital.wav", trailing_silence_s=0.0)
                await until(lambda: len(fake_llm.streams) == 1)  # the speculation asked the LLM
                await client.send_speech(b"", trailing_silence_s=1.5)
                done = await rec.wait_event("response.done")
            finally:
                await rec.aclose()
        assert done["text"] == fake_llm.reply and done["diagnostics"]["speculative"] is True
        assert "audio_held_ms" not in done["diagnostics"]  # no audio existed before the turn ended
        assert rec.audio_frames(0) > 0 and rec.events("response.audio.done")
        assert {e.get("turn_id") for e in rec.events() if e["type"] != "pong"} == {done["turn_id"]}
        assert stack.workers["llm"].speculations == {"started": 1, "confirmed": 1, "wasted": 0}
        assert len(await stored_history(settings, cid)) == 2


async def scrape(port: int) -> dict[tuple[str, str], float]:
    """A worker's /metrics as {(sample name, outcome or stage label): value}."""
    async with httpx.AsyncClient() as client:
        page = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        (sample.name, sample.labels.get("outcome", sample.labels.get("stage", ""))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


async def test_speaking_on_discards_the_speculation_without_a_trace(redis_url, transcriber, voice, fake_llm, bus_log):
    settings = spec_settings(redis_url)
    seen = await bus_log(settings.namespace)
    speculative = "Spoken too soon, never to be heard."
    fake_llm.reply, fake_llm.token_delay_s = speculative, 0.3  # still streaming when the user goes on
    ports = {"vad_stt": free_port(), "llm": free_port(), "tts": free_port()}
    async with run_stack(
        settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url, metrics_ports=ports
    ) as stack:
        async with VoiceClient(stack.ws_url) as client:
            rec = client.record()
            try:
                cid = client.conversation_id
                await speak(client, "capital.wav", trailing_silence_s=0.0)
                await until(lambda: len(fake_llm.streams) == 1)  # the speculation asked the LLM
                fake_llm.reply, fake_llm.token_delay_s = "The answer to both.", 0.002
                await speak(client, "color.wav", trailing_silence_s=1.5)  # the user goes on speaking
                done = await rec.wait_event("response.done")
            finally:
                await rec.aclose()
        await fake_llm.streams[0].wait_ended(timeout=10)
        assert not fake_llm.streams[0].completed  # the LLM server saw its client leave
        assert len(fake_llm.streams) == 2
        final = rec.events("transcript.final")[0]["text"]
        assert len(rec.events("transcript.final")) == 1 and "capital" in final.lower() and "color" in final.lower()
        assert fake_llm.streams[1].messages[-1] == {"role": "user", "content": final}
        # the reply to the whole turn was itself started on the second pause's early transcript
        assert done["text"] == "The answer to both." and done["diagnostics"]["speculative"] is True
        assert "".join(e["delta"] for e in rec.events("response.text.delta")) == done["text"]
        assert len(rec.events("response.audio.started")) == 1
        # the speculation's words went nowhere: not to the client, not on the bus, not into the history
        assert not any(b"too soon" in raw for raw in seen)
        assert not any("too soon" in json.dumps(f) for _, f in rec.frames if isinstance(f, dict))
        assert await stored_history(settings, cid) == [
            {"role": "user", "content": final},
            {"role": "assistant", "content": done["text"]},
        ]
        llm = stack.workers["llm"]
        assert llm.speculations == {"started": 2, "confirmed": 1, "wasted": 1}
        assert llm.speculation_wasted_s > 0
        page = await scrape(ports["llm"])
        assert page[("voicepipe_speculative_replies_started_total", "llm")] == 2
        assert page[("voicepipe_speculative_replies_total", "confirmed")] == 1
        assert page[("voicepipe_speculative_replies_total", "wasted")] == 1
        assert page[("voicepipe_speculation_wasted_seconds_total", "llm")] == pytest.approx(llm.speculation_wasted_s)
        tts_page = await scrape(ports["tts"])
        assert tts_page[("voicepipe_speculation_wasted_seconds_total", "tts")] == stack.workers["tts"].speculation_wasted_s
        tts = stack.workers["tts"].conversations.get(cid)
        assert tts is None or not tts.turns
        # whisper heard the first pause early for nothing, and the last one early for the final transcript
        vad_page = await scrape(ports["vad_stt"])
        assert vad_page[("voicepipe_early_transcripts_total", "final")] == 1
        assert vad_page[("voicepipe_early_transcripts_total", "stale")] >= 1


async def test_with_speculative_replies_off_the_reply_starts_at_the_end_of_the_turn(redis_url, transcriber, voice, fake_llm):
    settings = spec_settings(redis_url, speculative_reply=False)
    fake_llm.echo = True
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with VoiceClient(stack.ws_url) as client:
            rec = client.record()
            try:
                cid = client.conversation_id
                await speak(client, "capital.wav", trailing_silence_s=0.0)
                vad = stack.workers["vad_stt"]

                def early_transcript_ready() -> bool:
                    conv = vad.conversations.get(cid)
                    return conv is not None and conv.speculation is not None and conv.speculation.job.future.done()

                await until(early_transcript_ready)  # what would have started a speculation exists
                await client.send_json({"type": "ping"})
                await rec.wait_event("pong")
                await client.send_speech(b"", trailing_silence_s=1.5)
                done = await rec.wait_event("response.done")
            finally:
                await rec.aclose()
        assert len(fake_llm.streams) == 1
        final = rec.events("transcript.final")[0]["text"]
        assert done["text"] == fake_llm.reply_for([{"role": "user", "content": final}])
        assert done["diagnostics"]["speculative"] is False and "audio_held_ms" not in done["diagnostics"]
        assert stack.workers["llm"].speculations == {"started": 0, "confirmed": 0, "wasted": 0}
        assert await stored_history(settings, cid) == [
            {"role": "user", "content": final},
            {"role": "assistant", "content": done["text"]},
        ]


# ---- the orchestrator alone, its gateway and TTS played on the bus


async def test_a_changed_final_transcript_restarts_the_reply_on_the_new_words(redis_url, fake_llm):
    settings = make_settings(redis_url)
    fake_llm.echo, fake_llm.token_delay_s = True, 0.2
    async with driving(settings, llm_worker(settings, fake_llm)) as gw:
        await gw.open("c")
        await gw.send(TranscriptEarly(conversation_id="c", turn_id="t", text="What is the capital"))
        await until(lambda: len(fake_llm.streams) == 1)
        await until(lambda: gw.of("c", TtsSpeak, gw.tts_inbox))  # a first piece went to TTS, to be held
        held = gw.of("c", TtsSpeak, gw.tts_inbox)[0]
        assert held.reply_to == "t" and held.held and held.turn_id != "t"
        fake_llm.token_delay_s = 0.001
        await gw.send(TranscriptFinal(conversation_id="c", turn_id="t", text="What is the capital of Peru?", stt_ms=1))
        await until(lambda: gw.of("c", ResponseTextDone))
        await fake_llm.streams[0].wait_ended()
        assert not fake_llm.streams[0].completed
        assert fake_llm.streams[1].messages[-1] == {"role": "user", "content": "What is the capital of Peru?"}
        # the held audio is dropped at TTS, and the gateway hears only the new reply, under the user's turn
        assert [m.turn_id for m in gw.of("c", TtsStop, gw.names.tts_control)] == [held.turn_id]
        done = gw.of("c", ResponseTextDone)
        assert len(done) == 1 and done[0].turn_id == "t" and not done[0].speculative
        assert "What is the capital of Peru?" in done[0].text
        assert "".join(d.delta for d in gw.of("c", ResponseTextDelta)) == done[0].text
        again = [m for m in gw.of("c", TtsSpeak, gw.tts_inbox) if m.turn_id == "t"]
        assert again and all(m.reply_to is None and not m.held for m in again)
        stored = await gw.history("c", 2)
        assert stored == [{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": done[0].text}]
        assert gw.worker.speculations == {"started": 1, "confirmed": 0, "wasted": 1}


async def test_a_withdrawn_early_transcript_leaves_nothing_and_a_busy_conversation_does_not_speculate(redis_url, fake_llm):
    settings = make_settings(redis_url)
    fake_llm.echo, fake_llm.token_delay_s = True, 0.05
    async with driving(settings, llm_worker(settings, fake_llm)) as gw:
        await gw.open("c")
        await gw.send(TranscriptEarly(conversation_id="c", turn_id="t", text="Tell me"))
        await until(lambda: len(fake_llm.streams) == 1)
        await gw.send(TranscriptWithdrawn(conversation_id="c", turn_id="t"))
        await fake_llm.streams[0].wait_ended()
        assert not fake_llm.streams[0].completed
        await gw.handled_so_far()
        assert gw.of("c", ResponseTextDelta) == [] and gw.of("c", ResponseTextDone) == []
        assert gw.worker.conversations["c"].speculation is None
        assert gw.worker.holds("c")["generation_tasks"] == 0
        # while a reply is generating, an early transcript of the next turn starts nothing
        fake_llm.token_delay_s = 0.2
        await gw.send(TranscriptFinal(conversation_id="c", turn_id="u", text="Tell me a story.", stt_ms=1))
        await until(lambda: len(fake_llm.streams) == 2)
        await gw.send(TranscriptEarly(conversation_id="c", turn_id="v", text="And another"))
        await gw.handled_so_far()
        assert len(fake_llm.streams) == 2 and gw.worker.conversations["c"].speculation is None
        assert gw.worker.speculations == {"started": 1, "confirmed": 0, "wasted": 1}


# ---- the TTS worker alone (real piper), its orchestrator and gateway played on the bus


async def test_tts_holds_a_speculation_after_its_first_piece_and_releases_it_as_the_users_turn(redis_url, voice):
    settings = make_settings(redis_url)
    async with driving(settings, lambda client: TtsWorker(settings, client, voice=voice)) as gw:
        await gw.open("c")
        pieces = ["The capital of France", "is Paris, on the Seine.", "It is a large city."]
        for seq, text in enumerate(pieces):
            await gw.send(TtsSpeak(conversation_id="c", turn_id="s1", reply_to="t", held=True, text=text, seq=seq))
        await gw.send(TtsEnd(conversation_id="c", turn_id="s1", sentences=len(pieces)))
        conv = gw.worker.conversations["c"]
        await until(lambda: conv.turns["s1"].rendered == 1 and conv.turns["s1"].held)
        await gw.handled_so_far()
        assert conv.turns["s1"].rendered == 1  # only the first piece, until the turn is confirmed
        assert gw.of("c", TtsAudio) == [] and gw.of("c", TtsAudioStarted) == []  # nothing reached the gateway
        await gw.send(TtsRelease(conversation_id="c", turn_id="s1"))
        await until(lambda: gw.of("c", TtsAudioDone))
        started, audio, done = gw.of("c", TtsAudioStarted), gw.of("c", TtsAudio), gw.of("c", TtsAudioDone)
        assert [m.turn_id for m in started + done] == ["t", "t"] and {m.turn_id for m in audio} == {"t"}
        assert started[0].held_ms > 0
        assert [m.seq for m in audio] == list(range(len(audio)))
        assert sorted({m.piece for m in audio}) == [0, 1, 2]
        assert "c" in gw.worker.conversations and not conv.turns and not conv.queue
        assert gw.worker.speculation_wasted_s == 0


async def test_tts_drops_a_held_speculation_when_another_reply_begins(redis_url, voice):
    settings = make_settings(redis_url)
    async with driving(settings, lambda client: TtsWorker(settings, client, voice=voice)) as gw:
        await gw.open("c")
        await gw.send(TtsSpeak(conversation_id="c", turn_id="s1", reply_to="t", held=True, text="Too soon to say.", seq=0))
        await gw.send(TtsSpeak(conversation_id="c", turn_id="s1", reply_to="t", held=True, text="Never heard.", seq=1))
        conv = gw.worker.conversations["c"]
        await until(lambda: "s1" in conv.turns and conv.turns["s1"].held)
        # the orchestrator moved on (its stop may be late or lost): the next reply drops the held one
        await gw.send(TtsSpeak(conversation_id="c", turn_id="t", text="The real answer.", seq=0))
        await gw.send(TtsEnd(conversation_id="c", turn_id="t", sentences=1))
        await until(lambda: gw.of("c", TtsAudioDone))
        assert {m.turn_id for m in gw.of("c", TtsAudio)} == {"t"}
        assert {m.piece for m in gw.of("c", TtsAudio)} == {0}
        assert gw.of("c", TtsAudioStarted)[0].held_ms is None
        assert not conv.turns and not conv.queue
        assert gw.worker.speculation_wasted_s > 0
        # a late release of the dropped speculation sends nothing
        before = len(gw.of("c", TtsAudio))
        await gw.send(TtsRelease(conversation_id="c", turn_id="s1"))
        await gw.handled_so_far()
        assert len(gw.of("c", TtsAudio)) == before


async def test_tts_makes_a_released_speculations_waiting_first_piece_urgent(redis_url, voice):
    """Released while its first piece still waits for the voice (another conversation's long piece
    under way): the piece is what its user waits on now, so it goes as urgent work."""
    settings = make_settings(redis_url)
    async with driving(settings, lambda client: TtsWorker(settings, client, voice=voice)) as gw:
        await gw.open("x")
        await gw.open("c")
        long_text = " ".join(["The quick brown fox jumps over the lazy dog beside the quiet river."] * 16)
        await gw.send(TtsSpeak(conversation_id="x", turn_id="r", text=long_text, seq=0))
        scheduler = gw.worker.scheduler
        await until(lambda: scheduler.running == "x")
        await gw.send(TtsSpeak(conversation_id="c", turn_id="s1", reply_to="t", held=True, text="Paris.", seq=0))
        await gw.send(TtsEnd(conversation_id="c", turn_id="s1", sentences=1))
        await until(lambda: scheduler.waiting("c") == 1)
        assert scheduler.running == "x"  # the speculation's piece waits, not urgent: its user is still speaking
        await gw.send(TtsRelease(conversation_id="c", turn_id="s1"))
        await until(lambda: gw.of("c", TtsAudioDone))
        served = [s for s in scheduler.served if s.label == "speak:s1"]
        assert len(served) == 1 and served[0].urgent  # made urgent by the release before it was dispatched
        assert [m.turn_id for m in gw.of("c", TtsAudioStarted)] == ["t"]
