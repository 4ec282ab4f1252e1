"""Turn-taking over real sockets, real Redis and the real VAD, whisper and piper (a fake LLM server):
barge-in while a reply generates or plays, a noise burst that must not interrupt, `response.cancel`,
and how the history records a reply the user did not hear to the end."""
from __future__ import annotations

import json
from array import array
from pathlib import Path

from shared.messages import ResponseCancel
from tests.support.admin import admin_get
from tests.support.ws import collect_until, connect, next_event
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

FIXTURES = Path(__file__).parent.parent / "fixtures"
LONG_REPLY = " ".join(
    [
        "Paris is the capital of France, and it sits on the river Seine.",
        "It has been the heart of French life for more than a thousand years.",
        "Millions of people visit it every year to see its museums and its old streets.",
        "The Eiffel Tower was built for a world fair and was meant to stand for twenty years.",
        "Today it is the symbol of the whole city and one of the best known buildings on earth.",
    ]
)


async def speak(client: VoiceClient, name: str = "capital.wav", trailing_silence_s: float = 1.0) -> None:
    await client.send_speech(read_audio_16k_mono(FIXTURES / name), realtime=True, trailing_silence_s=trailing_silence_s)


async def history(redis_client, settings, conversation_id: str) -> list[dict]:
    return json.loads(await redis_client.hget(f"{settings.namespace}:conv:{conversation_id}:history", "messages"))


async def test_barge_in_during_generation_stops_the_reply_everywhere_and_answers_the_new_question(
    stack, fake_llm, redis_client, settings
):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.12
    async with VoiceClient(stack.ws_url) as client:
        rec = client.record()
        try:
            await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
            first = await rec.wait_event("response.text.delta")
            old = first["turn_id"]
            await rec.wait_audio(3)  # some of the reply is playing
            await speak(client)
            at, _, interrupted = await rec.wait(lambda e: e["type"] == "response.interrupted")
            assert interrupted == {"type": "response.interrupted", "turn_id": old, "reason": "barge_in"}
            assert not fake_llm.streams[0].completed
            await fake_llm.streams[0].wait_ended()  # the orchestrator closed the upstream stream
            fake_llm.token_delay_s = 0.002
            _, _, final = await rec.wait(lambda e: e["type"] == "transcript.final" and e["text"])
            new = final["turn_id"]
            assert new != old and "capital" in final["text"].lower()
            done = await rec.wait_event("response.done", new)
            # not one audio frame of the old turn after response.interrupted: every frame after it
            # belongs to the new turn, whose audio starts with response.audio.started
            end, _, _ = await rec.wait(lambda e: e["type"] == "response.audio.started" and e["turn_id"] == new)
            assert rec.audio_frames(at, end) == 0
            assert not any(isinstance(e, dict) and e.get("turn_id") == old for _, e in rec.frames[at + 1 :])
            assert done["text"] == LONG_REPLY
        finally:
            await rec.aclose()
        cid = client.session["conversation_id"]
        stored = await history(redis_client, settings, cid)
    # the interrupted reply keeps only the text whose audio the client was sent, marked as such
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    cut = stored[1]
    assert cut["note"] == "interrupted" and cut["content"]
    assert LONG_REPLY.startswith(cut["content"]) and len(cut["content"]) < len(LONG_REPLY) // 2
    assert "note" not in stored[3] and stored[3]["content"] == LONG_REPLY
    # the second request told the LLM the first reply was cut short
    sent = fake_llm.streams[-1].messages
    assert sent[2]["role"] == "assistant" and sent[2]["content"].startswith(cut["content"]) and "interrupted" in sent[2]["content"]
    # and every stage let go of the old turn
    llm = stack.workers["llm"].conversations.get(cid)
    assert llm is None or llm.current is None or llm.current.turn_id != old


async def test_barge_in_while_the_reply_is_still_playing(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.001
    async with VoiceClient(stack.ws_url) as client:
        rec = client.record()
        try:
            await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
            done = await rec.wait_event("response.done")  # every frame sent; the client plays for seconds more
            old = done["turn_id"]
            await speak(client)
            interrupted = await rec.wait_event("response.interrupted")
            assert interrupted["turn_id"] == old and interrupted["reason"] == "barge_in"
            _, _, final = await rec.wait(lambda e: e["type"] == "transcript.final" and e["text"])
            assert "capital" in final["text"].lower()
            await rec.wait_event("response.done", final["turn_id"])
        finally:
            await rec.aclose()


async def test_a_noise_burst_during_playback_does_not_interrupt(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.001
    speech = array("h", read_audio_16k_mono(FIXTURES / "capital.wav"))
    loudest = max(range(0, len(speech) - 1600, 320), key=lambda i: sum(abs(x) for x in speech[i : i + 1600]))
    burst = speech[loudest : loudest + 1600].tobytes()  # 100 ms of real speech: loud enough to start the VAD
    async with VoiceClient(stack.ws_url) as client:
        rec = client.record()
        try:
            await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
            await rec.wait_event("response.audio.started")
            await client.send_speech(burst, realtime=True, trailing_silence_s=0.8)
            started = await rec.wait_event("speech.started")  # the VAD heard it
            heard = await rec.wait_event("transcript.final", started["turn_id"])
            assert heard["text"] == ""  # too short to be an utterance
            await client.send_json({"type": "ping"})
            await rec.wait_event("pong")
            assert rec.events("response.interrupted") == []
            done = await rec.wait_event("response.done")
            assert done["text"] == LONG_REPLY
        finally:
            await rec.aclose()


async def test_speech_that_began_before_a_typed_turn_does_not_interrupt_it(stack, fake_llm):
    speech = read_audio_16k_mono(FIXTURES / "capital.wav")
    async with VoiceClient(stack.ws_url) as client:
        rec = client.record()
        try:
            await client.send_speech(speech[: 16000 * 2 // 2], realtime=False, trailing_silence_s=0)  # 500 ms
            await client.send_json({"type": "text.input", "text": "Hello there."})
            await rec.wait_event("speech.started")
            done = await rec.wait_event("response.done")
            assert done["text"] == fake_llm.reply
            assert rec.events("response.interrupted") == []
        finally:
            await rec.aclose()


async def test_response_cancel_while_playing_and_a_cancel_with_nothing_playing(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.001
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "Tell me about Paris."}))
        events, _ = await collect_until(ws, "response.done")
        await ws.send(json.dumps({"type": "response.cancel"}))
        interrupted = await next_event(ws)
        assert interrupted == {"type": "response.interrupted", "turn_id": events[-1]["turn_id"], "reason": "cancelled"}
        await ws.send(json.dumps({"type": "response.cancel"}))  # nothing is playing any more: no event
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"


async def test_a_late_cancel_for_an_earlier_turn_never_stops_the_current_one(stack, fake_llm):
    ws, started = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "First question."}))
        events, _ = await collect_until(ws, "response.done")
        earlier = events[-1]["turn_id"]
        fake_llm.token_delay_s = 0.1
        await ws.send(json.dumps({"type": "text.input", "text": "Second question."}))
        # the earlier reply may still be playing: the typed turn interrupts it first
        events, _ = await collect_until(ws, "response.text.delta")
        assert [e["turn_id"] for e in events if e["type"] == "response.interrupted"] in ([], [earlier])
        current = events[-1]["turn_id"]
        late = ResponseCancel(conversation_id=started["conversation_id"], turn_id=earlier, reason="cancelled")
        await stack.gateway.bus.publish(stack.workers["llm"].inbox, late)
        events, audio = await collect_until(ws, "response.done")
        assert events[-1]["turn_id"] == current and events[-1]["text"] == fake_llm.reply and audio
        assert not any(e["type"] == "response.interrupted" for e in events)
        assert fake_llm.streams[-1].completed


async def test_with_barge_in_off_speech_waits_for_the_reply(redis_url, redis_client, transcriber, voice, fake_llm):
    from tests.conftest import make_settings
    from tests.support.stack import run_stack

    settings = make_settings(redis_url, barge_in_min_speech_ms=0)
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.05
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with VoiceClient(stack.ws_url) as client:
            rec = client.record()
            try:
                await client.send_json({"type": "text.input", "text": "Tell me about Paris."})
                first = await rec.wait_event("response.text.delta")
                await speak(client)
                _, _, final = await rec.wait(lambda e: e["type"] == "transcript.final" and e["text"])
                # both turns are answered in order, the first one whole
                first_done, _, done = await rec.wait(lambda e: e["type"] == "response.done" and e["turn_id"] == first["turn_id"])
                assert done["text"] == LONG_REPLY
                second_done, _, _ = await rec.wait(lambda e: e["type"] == "response.done" and e["turn_id"] == final["turn_id"])
                assert first_done < second_done
                assert rec.events("response.interrupted") == []
                assert all(s.completed for s in fake_llm.streams)
            finally:
                await rec.aclose()


async def test_turn_bookkeeping_stays_bounded(stack, fake_llm):
    fake_llm.token_delay_s = 0.0
    fake_llm.reply = "Yes."
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    async with ws:
        for i in range(40):
            await ws.send(json.dumps({"type": "text.input", "text": f"Question {i}?"}))
            if i % 2:
                await ws.send(json.dumps({"type": "response.cancel"}))
            await ws.send(json.dumps({"type": "ping"}))
            while (await next_event(ws, timeout=30))["type"] != "pong":
                pass
        conversation = stack.gateway.conversations[cid]
        assert len(conversation.turns) <= 8
        tts = stack.workers["tts"].conversations[cid]
        assert len(tts.stopped_turns) <= 16
        state = await admin_get(stack, f"/admin/conversations/{cid}")
        assert state["connected"]
