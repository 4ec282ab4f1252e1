"""Turns through the real pipeline (real VAD, whisper and piper; a fake LLM server) over real Redis."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

from tests.support.ws import collect_until, connect, next_event
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

FIXTURES = Path(__file__).parent.parent / "fixtures"
SPOKEN_KEYS = {
    "speech_end_to_transcript_ms", "transcript_to_first_token_ms", "first_token_to_first_audio_ms",
    "speech_end_to_first_audio_ms", "stt_ms", "llm_ms", "tts_ms",
}


def types(events):
    return [e["type"] for e in events]


async def test_typed_turn_streams_text_and_audio(stack, voice, fake_llm):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "What is the capital of France?"}))
        events, audio = await collect_until(ws, "response.done")
    kinds = types(events)
    assert kinds[0] == "response.text.delta"
    assert kinds.index("response.audio.started") < kinds.index("response.audio.done") < kinds.index("response.done")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    done = events[-1]
    assert done["text"] == deltas == fake_llm.reply
    turn_ids = {e.get("turn_id") for e in events}
    assert len(turn_ids) == 1 and None not in turn_ids
    started = next(e for e in events if e["type"] == "response.audio.started")
    assert started["sample_rate"] == voice.sample_rate
    total = sum(len(chunk) for chunk in audio)
    assert total > voice.sample_rate * 2 * 1.5  # two sentences of speech, well over 1.5 s
    assert max(len(chunk) for chunk in audio) <= voice.sample_rate * 2 // 10  # chunks of at most 100 ms
    metrics = done["metrics"]
    assert {"transcript_to_first_token_ms", "first_token_to_first_audio_ms", "llm_ms", "tts_ms"} <= set(metrics)
    assert not {"stt_ms", "speech_end_to_transcript_ms", "speech_end_to_first_audio_ms"} & set(metrics)
    assert all(value >= 0 for value in metrics.values())


async def test_spoken_turn_is_heard_answered_and_timed(stack):
    pcm = read_audio_16k_mono(FIXTURES / "capital.wav")
    async with VoiceClient(stack.ws_url) as client:
        sender = asyncio.create_task(client.send_speech(pcm, realtime=False))
        turn = await client.receive_turn(timeout=60)
        await sender
    kinds = [e["type"] for e in turn.events]
    assert kinds[:3] == ["speech.started", "speech.stopped", "transcript.final"]
    assert "capital" in turn.transcript.lower()
    assert turn.done is not None and turn.done["text"]
    assert len(turn.audio) > 0
    metrics = turn.done["metrics"]
    assert set(metrics) == SPOKEN_KEYS  # exactly docs/protocol.md §1.1
    assert metrics["speech_end_to_first_audio_ms"] >= metrics["speech_end_to_transcript_ms"]
    assert metrics["speech_end_to_transcript_ms"] >= turn.done["diagnostics"]["endpointing_ms"] >= 0
    assert turn.done["diagnostics"]["pipeline_overhead_ms"] >= 0
    assert len({e.get("turn_id") for e in turn.events}) == 1


async def test_commit_ends_the_utterance_without_waiting_for_silence(stack):
    pcm = read_audio_16k_mono(FIXTURES / "hello.wav")
    ws, _ = await connect(stack.ws_url)
    async with ws:
        for offset in range(0, len(pcm), 640):  # speech only, no trailing silence
            await ws.send(pcm[offset : offset + 640].ljust(640, b"\0"))
        first = await next_event(ws)
        assert first["type"] == "speech.started"
        await ws.send(json.dumps({"type": "input_audio.commit"}))
        events, _ = await collect_until(ws, "transcript.final", timeout=30)
        assert types(events)[0] == "speech.stopped"
        assert "how are you" in events[-1]["text"].lower()


async def test_silence_alone_starts_no_turn(stack):
    ws, _ = await connect(stack.ws_url)
    async with ws:
        for _ in range(50):
            await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "input_audio.commit"}))
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"


async def test_the_next_reply_knows_the_earlier_turns(stack, fake_llm, redis_client, settings):
    fake_llm.echo = True
    ws, started = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "My name is Ada."}))
        await collect_until(ws, "response.done")
        await ws.send(json.dumps({"type": "text.input", "text": "What is my name?"}))
        events, _ = await collect_until(ws, "response.done")
    assert events[-1]["text"] == "You said What is my name?. I remember 1 earlier questions."
    sent = fake_llm.streams[-1].messages
    assert sent[0] == {"role": "system", "content": settings.system_prompt}
    assert sent[1] == {"role": "user", "content": "My name is Ada."}
    assert sent[2]["role"] == "assistant" and sent[-1] == {"role": "user", "content": "What is my name?"}
    history_key = f"{settings.namespace}:conv:{started['conversation_id']}:history"
    assert len(json.loads(await redis_client.hget(history_key, "messages"))) == 4
    # only a digest of the resume token is kept (gateway/hub.py), never the token itself
    digest = hashlib.sha256(started["resume_token"].encode()).hexdigest()
    assert (await redis_client.hget(history_key, "resume_token_sha256")).decode() == digest
    assert started["resume_token"].encode() not in b"".join((await redis_client.hgetall(history_key)).values())
    assert 0 < await redis_client.ttl(history_key) <= settings.resume_window_s + settings.stale_timeout_s


async def test_failing_llm_gives_llm_unavailable_and_the_conversation_stays_usable(stack, fake_llm):
    fake_llm.fail_status = 500
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "Hello?"}))
        events, _ = await collect_until(ws, "response.done")
        error = next(e for e in events if e["type"] == "error")
        assert error["code"] == "llm_unavailable" and "500" in error["message"]
        assert events[-1]["text"] == ""
        fake_llm.fail_status = None
        await ws.send(json.dumps({"type": "text.input", "text": "Hello again?"}))
        events, audio = await collect_until(ws, "response.done")
        assert events[-1]["text"] == fake_llm.reply and audio


async def test_malformed_llm_stream_gives_llm_error(stack, fake_llm):
    fake_llm.malformed = True
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "Hello?"}))
        events, _ = await collect_until(ws, "response.done")
    assert any(e["type"] == "error" and e["code"] == "llm_error" for e in events)


async def test_unreachable_llm_gives_llm_unavailable(redis_url, redis_client, transcriber, voice):
    from tests.conftest import make_settings
    from tests.support.stack import run_stack
    from voicepipe.embedded import free_port

    settings = make_settings(redis_url)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=f"http://127.0.0.1:{free_port()}/v1") as stack:
        ws, _ = await connect(stack.ws_url)
        async with ws:
            await ws.send(json.dumps({"type": "text.input", "text": "Anyone there?"}))
            events, _ = await collect_until(ws, "response.done")
            assert any(e["type"] == "error" and e["code"] == "llm_unavailable" for e in events)
            await ws.send(json.dumps({"type": "ping"}))
            assert (await next_event(ws))["type"] == "pong"


async def test_response_cancel_interrupts_and_closes_the_upstream_stream(stack, fake_llm):
    fake_llm.token_delay_s = 0.2
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "Talk slowly."}))
        first = await next_event(ws)
        assert first["type"] == "response.text.delta"
        await ws.send(json.dumps({"type": "response.cancel"}))
        events, _ = await collect_until(ws, "response.interrupted")
        assert events[-1]["reason"] == "cancelled" and events[-1]["turn_id"] == first["turn_id"]
        cancelled_at = time.monotonic()
        assert await fake_llm.streams[-1].wait_ended() - cancelled_at < 0.5
        assert not fake_llm.streams[-1].completed
        # nothing more arrives for the cancelled turn; the next turn works
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"
        fake_llm.token_delay_s = 0.001
        await ws.send(json.dumps({"type": "text.input", "text": "Again."}))
        events, _ = await collect_until(ws, "response.done")
        assert {e["turn_id"] for e in events} != {first["turn_id"]}


async def test_disconnect_mid_reply_closes_the_upstream_stream_and_frees_every_worker(stack, fake_llm, redis_client, settings):
    fake_llm.token_delay_s = 0.2
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    await ws.send(json.dumps({"type": "text.input", "text": "Tell me a long story."}))
    assert (await next_event(ws))["type"] == "response.text.delta"
    await ws.close()
    closed_at = time.monotonic()
    assert await fake_llm.streams[-1].wait_ended() - closed_at < 0.5
    assert not fake_llm.streams[-1].completed
    async with asyncio.timeout(2):
        while any(cid in w.conversation_ids() for w in stack.workers.values()):
            await asyncio.sleep(0.005)
    keys = sorted([k.decode() async for k in redis_client.scan_iter(match=f"{settings.namespace}:conv:{cid}*")])
    assert keys == [f"{settings.namespace}:conv:{cid}:history"]  # only the record kept for resume


async def test_interim_transcripts_when_enabled(redis_url, redis_client, transcriber, voice, fake_llm):
    from tests.conftest import make_settings
    from tests.support.stack import run_stack

    settings = make_settings(redis_url, stt_partials=True, stt_partial_interval_ms=500)
    pcm = read_audio_16k_mono(FIXTURES / "moon.wav")
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with VoiceClient(stack.ws_url) as client:
            sender = asyncio.create_task(client.send_speech(pcm, realtime=True))
            turn = await client.receive_turn(timeout=60)
            await sender
    kinds = [e["type"] for e in turn.events]
    partials = [e for e in turn.events if e["type"] == "transcript.partial"]
    assert partials, kinds
    assert kinds.index("transcript.partial") < kinds.index("speech.stopped")
    assert all(p["turn_id"] == turn.events[0]["turn_id"] and p["text"] for p in partials)
    assert "moon" in turn.transcript.lower()
