"""`/v1/realtime` through the stock `openai` SDK (`AsyncOpenAI(base_url=...).realtime.connect`), with
only the base URL changed, against a real stack: the real VAD, whisper and piper over real Redis,
and the fake LLM server. Spoken turns with server VAD, typed turns with manual turn detection,
`response.cancel`, barge-in, truncation, bad events, authentication, and a disconnect in the middle
of a reply that every worker cleans up."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import websockets

from shared.resample import resample
from tests.conftest import make_settings
from tests.support.admin import admin_get
from tests.support.stack import run_stack
from voicepipe.wavio import read_audio_16k_mono

FIXTURES = Path(__file__).parent.parent / "fixtures"
RATE = 24000
CHUNK = RATE * 2 // 50  # 20 ms of PCM16 at 24 kHz
LONG_REPLY = " ".join(
    [
        "Paris is the capital of France, and it sits on the river Seine.",
        "It has been the heart of French life for more than a thousand years.",
        "Millions of people visit it every year to see its museums and its old streets.",
        "The Eiffel Tower was built for a world fair and was meant to stand for twenty years.",
    ]
)


def sdk(stack, token: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=token, max_retries=0)


def speech_24k(name: str = "capital.wav") -> bytes:
    return resample(read_audio_16k_mono(FIXTURES / name), 16000, RATE)


async def stream(conn, pcm: bytes, trailing_silence_s: float = 1.0) -> None:
    """Append audio in 20 ms chunks at real-time pace, then silence."""
    pcm = pcm + bytes(int(trailing_silence_s * RATE) * 2)
    start = time.monotonic()
    for offset in range(0, len(pcm), CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[offset : offset + CHUNK]).decode())
        ahead = start + (offset + CHUNK) / (RATE * 2) - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def ask(conn, text: str) -> None:
    """A typed user message, then the request for its answer (the Realtime API's two steps)."""
    await conn.conversation.item.create(item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}],
    })
    await conn.response.create()


async def until_done(conn) -> None:
    """Read events until the next `response.done`."""
    while (await conn.recv()).type != "response.done":
        pass


class Events:
    """Every server event of a connection, read in the background, as the SDK's typed models."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.all: list[Any] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.conn:
            self.all.append(event)
            self._new.set()

    def of(self, type_: str) -> list[Any]:
        return [e for e in self.all if e.type == type_]

    async def wait(self, type_: str, where=lambda e: True, timeout: float = 60.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                found = next((e for e in self.all if e.type == type_ and where(e)), None)
                if found is not None:
                    return found
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"connection ended before {type_}")
                self._new.clear()
                await self._new.wait()

    def after(self, event: Any) -> list[Any]:
        return self.all[self.all.index(event) + 1 :]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> "Events":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def workers_clean(stack, conversation_id: str, timeout: float = 10.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            state = await admin_get(stack, f"/admin/conversations/{conversation_id}")
            if not state["connected"] and all(not any(w["holds"].values()) for w in state["workers"]):
                return state
            await asyncio.sleep(0.05)


def conversation_of(stack) -> str:
    [cid] = list(stack.gateway.conversations)
    return cid


async def test_a_spoken_turn_with_server_vad(stack, fake_llm):
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            created = await events.wait("session.created")
            assert created.session.audio.input.format.rate == RATE
            await stream(conn, speech_24k())
            started = await events.wait("input_audio_buffer.speech_started")
            stopped = await events.wait("input_audio_buffer.speech_stopped")
            assert stopped.item_id == started.item_id and stopped.audio_end_ms > started.audio_start_ms
            committed = await events.wait("input_audio_buffer.committed")
            assert committed.item_id == started.item_id
            transcript = await events.wait("conversation.item.input_audio_transcription.completed")
            assert "capital" in transcript.transcript.lower() and transcript.item_id == started.item_id
            done = await events.wait("response.done")
            assert done.response.status == "completed"
            timings = done.response.model_extra["voicepipe"]  # the turn's §1.1 figures, as on /v1/ws
            assert timings["metrics"]["speech_end_to_first_audio_ms"] > 0 and "endpointing_ms" in timings["diagnostics"]
            [item] = done.response.output
            assert item.role == "assistant" and item.content[0].transcript == fake_llm.reply
            deltas = events.of("response.output_audio.delta")
            audio = b"".join(base64.b64decode(d.delta) for d in deltas)
            assert len(audio) > RATE * 2  # more than a second of speech, at 24 kHz
            assert {d.response_id for d in deltas} == {done.response.id} and {d.item_id for d in deltas} == {item.id}
            text = "".join(d.delta for d in events.of("response.output_audio_transcript.delta"))
            assert text == fake_llm.reply
            order = [e.type for e in events.all]
            for earlier, later in [
                ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
                ("input_audio_buffer.committed", "response.created"),
                ("response.created", "response.output_audio.delta"),
                ("response.output_audio.done", "response.done"),
            ]:
                assert order.index(earlier) < order.index(later), (earlier, later)
            assert len({e.event_id for e in events.all}) == len(events.all)  # every event has its own id
    # the user's words reached the LLM as the pipeline transcribed them
    assert "capital" in fake_llm.streams[-1].messages[-1]["content"].lower()


async def test_a_typed_turn_with_manual_turn_detection_and_instructions(stack, fake_llm):
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await conn.session.update(session={
                "type": "realtime", "instructions": "Answer like a pirate.",
                "audio": {"input": {"turn_detection": None}},
            })
            updated = await events.wait("session.updated")
            assert updated.session.audio.input.turn_detection is None
            await conn.conversation.item.create(item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}],
            })
            added = await events.wait("conversation.item.added")
            assert added.item.role == "user"
            await conn.response.create()
            done = await events.wait("response.done")
            assert done.response.status == "completed"
            assert done.response.output[0].content[0].transcript == fake_llm.reply
            assert events.of("response.output_audio.delta")
    sent = fake_llm.streams[-1].messages
    assert sent[0] == {"role": "system", "content": "Answer like a pirate."}
    assert sent[-1] == {"role": "user", "content": "What is the capital of France?"}


async def test_a_manual_audio_turn_ends_only_at_the_commit(stack, fake_llm):
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await events.wait("session.updated")
            await stream(conn, speech_24k(), trailing_silence_s=1.5)
            # 1.5 s of silence ended nothing: a session.update answered after it proves it
            await conn.session.update(session={"type": "realtime"})
            await events.wait("session.updated", lambda e: e is not events.of("session.updated")[0])
            assert not events.of("input_audio_buffer.committed") and not events.of("input_audio_buffer.speech_stopped")
            await conn.input_audio_buffer.commit()
            transcript = await events.wait("conversation.item.input_audio_transcription.completed")
            assert "capital" in transcript.transcript.lower()
            await conn.response.create()  # the reply is on its way already: this asks for nothing more
            done = await events.wait("response.done")
            assert done.response.status == "completed"
            assert not events.of("input_audio_buffer.speech_started")  # no VAD events in manual mode


async def test_response_cancel_mid_audio(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.05
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await ask(conn, "Tell me about Paris.")
            await events.wait("response.output_audio.delta")
            await conn.response.cancel()
            done = await events.wait("response.done")
            assert done.response.status == "cancelled"
            assert done.response.status_details.reason == "client_cancelled"
            await fake_llm.streams[0].wait_ended()
            assert not fake_llm.streams[0].completed  # the LLM server saw its client leave
            # nothing of it after response.done: a later event marks the end of what could come
            await conn.response.cancel()  # nothing to cancel now: an error, and the socket stays
            error = await events.wait("error")
            assert error.error.code == "response_cancel_not_active"
            later = events.after(done)
            assert [e.type for e in later] == ["error"]


async def test_barge_in_cancels_the_reply_with_turn_detected(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.12
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await ask(conn, "Tell me about Paris.")
            first = await events.wait("response.created")
            await events.wait("response.output_audio.delta")
            await stream(conn, speech_24k())
            cancelled = await events.wait("response.done", lambda e: e.response.id == first.response.id)
            assert cancelled.response.status == "cancelled"
            assert cancelled.response.status_details.reason == "turn_detected"
            transcript = await events.wait("conversation.item.input_audio_transcription.completed")
            assert "capital" in transcript.transcript.lower()
            fake_llm.token_delay_s = 0.002
            second = await events.wait("response.done", lambda e: e.response.id != first.response.id)
            assert second.response.status == "completed"
            assert not any(
                getattr(e, "response_id", None) == first.response.id for e in events.after(cancelled)
            )  # not one delta of the interrupted reply after its response.done


async def test_truncate_cuts_the_reply_in_the_history(stack, fake_llm, redis_client, settings):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.001
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await ask(conn, "Tell me about Paris.")
            done = await events.wait("response.done")
            item = done.response.output[0]
            cid = conversation_of(stack)
            await conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=1500)
            truncated = await events.wait("conversation.item.truncated")
            assert truncated.item_id == item.id and truncated.audio_end_ms == 1500
            key = f"{settings.namespace}:conv:{cid}:history"
            async with asyncio.timeout(10):
                while True:
                    stored = json.loads(await redis_client.hget(key, "messages"))
                    if stored[-1].get("note") == "interrupted":
                        break
                    await asyncio.sleep(0.02)
            assert LONG_REPLY.startswith(stored[-1]["content"]) and 0 < len(stored[-1]["content"]) < len(LONG_REPLY) // 2
            await conn.conversation.item.truncate(item_id="item_unknown", content_index=0, audio_end_ms=10)
            assert (await events.wait("error")).error.code == "item_not_found"


async def test_bad_events_get_an_error_and_the_socket_stays(stack):
    async with sdk(stack) as client, client.realtime.connect(model="gpt-realtime") as conn:
        async with Events(conn) as events:
            await events.wait("session.created")
            await conn.send_raw("{not json")
            await conn.send_raw(json.dumps({"type": "output_audio_buffer.clear", "event_id": "evt_1"}))
            await conn.send_raw(json.dumps({"type": "input_audio_buffer.append", "audio": "!!!"}))
            await conn.send_raw(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}))
            await conn.send_raw(json.dumps({"type": "input_audio_buffer.commit"}))
            await conn.session.update(session={"type": "realtime"})
            await events.wait("session.updated")
            errors = [e.error for e in events.of("error")]
            assert [e.code for e in errors] == [
                "invalid_event", "unsupported_event", "invalid_event", "unsupported_format", "input_audio_buffer_commit_empty",
            ]
            assert errors[1].event_id == "evt_1" and "output_audio_buffer.clear" in errors[1].message


async def test_a_disconnect_mid_response_leaves_every_worker_clean(stack, fake_llm):
    fake_llm.reply, fake_llm.token_delay_s = LONG_REPLY, 0.1
    async with sdk(stack) as client:
        async with client.realtime.connect(model="gpt-realtime") as conn:
            events = Events(conn)
            await ask(conn, "Tell me about Paris.")
            await events.wait("response.output_audio.delta")
            cid = conversation_of(stack)
            await events.aclose()
        state = await workers_clean(stack, cid)
    assert {w["stage"] for w in state["workers"]} == {"vad_stt", "llm", "tts"}
    await fake_llm.streams[0].wait_ended()
    assert not fake_llm.streams[0].completed
    stats = await admin_get(stack, "/admin/resources/stats")
    assert stats["connections"]["current"] == 0


async def test_tokens_as_bearer_and_as_the_browser_subprotocol(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, client_tokens=["s3cret"])
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        async with sdk(stack, token="s3cret") as client, client.realtime.connect(model="gpt-realtime") as conn:
            assert (await conn.recv()).type == "session.created"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with sdk(stack, token="wrong") as client, client.realtime.connect(model="gpt-realtime") as conn:
                await conn.recv()
        assert refused.value.response.status_code == 403
        url = f"ws://127.0.0.1:{stack.port}/v1/realtime?model=gpt-realtime"
        async with websockets.connect(url, subprotocols=["realtime", "openai-insecure-api-key.s3cret"]) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"


async def test_a_realtime_conversation_is_taken_up_again_on_a_new_socket(stack, fake_llm):
    """Resume, as on /v1/ws: session.created says how (`voicepipe`), the token rotates, and the
    history goes on; a wrong token is refused before anything is opened."""
    async with sdk(stack) as client:
        async with client.realtime.connect(model="gpt-realtime") as conn:
            created = await conn.recv()
            first = created.model_extra["voicepipe"]
            assert first["resumed"] is False and first["resume_token"]
            await ask(conn, "Remember the word lantern.")
            await until_done(conn)
        query = {"conversation_id": first["conversation_id"], "resume_token": first["resume_token"]}
        async with client.realtime.connect(model="gpt-realtime", extra_query=query) as conn:
            again = (await conn.recv()).model_extra["voicepipe"]
            assert again["resumed"] is True and again["conversation_id"] == first["conversation_id"]
            assert again["resume_token"] != first["resume_token"]  # rotated: the old one is spent
            await ask(conn, "Which word?")
            await until_done(conn)
        assert [m["content"] for m in fake_llm.streams[-1].messages if m["role"] == "user"] == [
            "Remember the word lantern.", "Which word?"
        ]
        async with client.realtime.connect(model="gpt-realtime", extra_query=query) as conn:
            refused = await conn.recv()
            assert refused.type == "error" and refused.error.code == "unknown_conversation"
