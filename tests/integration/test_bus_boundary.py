"""The bus is a boundary: garbage on any channel, or in a heartbeat, is dropped and every process
goes on working. Each check ends on a positive marker: the garbage was seen (a counter moved), and
then a turn completes, /readyz says 200 and every worker answers introspection."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import shared.bus
from shared.bus import SubscriberStats, run_subscriber
from shared.channels import Names
from shared.clock import now_ms
from shared.messages import SpeechStopped, TextInput
from shared.messages.codec import encode
from tests.support.admin import admin_get
from tests.support.ws import collect_until, connect, next_event
from voicepipe.wavio import read_audio_16k_mono

SECRET = "personal-words-never-logged"
GARBAGE = [
    b"[" * 100_000,  # nested far too deeply for any JSON parser
    b"\x00" + (100_000).to_bytes(4, "big") + b"[" * 100_000,  # the same in the audio form's header
    b"\x00\xff\xff\xff\xff" + b'{"type": "audio.in"}',  # a length prefix that overruns the data
    b"\x00\x00",  # a length prefix cut short
    b'{"type": "text.input", "conversation_id": "\xff\xfe", "text": "x"}',  # not UTF-8
    json.dumps({"type": "text.input", "conversation_id": 7, "text": [SECRET]}).encode(),  # wrong types
    json.dumps({"type": "connection_disconnected", "conversation_id": "c", "reason": "bored"}).encode(),
    b'{"type": "audio.commit", "conversation_id": "c", "received_ms": NaN}',
    b"\x00" + (10).to_bytes(4, "big") + b'{"type": 1}' + b"\x01",  # odd-length audio behind a bad header
    json.dumps({"type": "no.such.type", "conversation_id": "c", "text": SECRET}).encode(),
    b"",
]
SPEECH = read_audio_16k_mono(Path(__file__).parent.parent / "fixtures" / "hello.wav")


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def typed_turn(stack, text: str = "Are you still there?") -> None:
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": text}))
        events, audio = await collect_until(ws, "response.done", timeout=60)
    assert events[-1]["text"] and audio


async def spoken_turn(stack) -> str:
    ws, _ = await connect(stack.ws_url)
    async with ws:
        for offset in range(0, len(SPEECH), 640):
            await ws.send(SPEECH[offset : offset + 640].ljust(640, b"\0"))
        await ws.send(json.dumps({"type": "input_audio.commit"}))
        events, _ = await collect_until(ws, "transcript.final", timeout=60)
    return events[-1]["text"]


async def everything_works(stack) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{stack.http_url}/readyz")).status_code == 200
    workers = (await admin_get(stack, "/admin/workers"))["workers"]
    assert {w["stage"] for w in workers if w["responding"]} == {"vad_stt", "llm", "tts"}
    assert "how are you" in (await spoken_turn(stack)).lower()
    await typed_turn(stack)


async def test_garbage_on_every_channel_is_dropped_and_every_process_keeps_working(stack, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    names = Names.from_settings(stack.settings)
    workers = stack.workers.values()
    channels = [names.connection_events, names.control, names.tts_control, stack.gateway.inbox]
    channels += [w.inbox for w in workers]
    for channel in channels:
        for data in GARBAGE:
            await redis_client.publish(channel, data)
    n = len(GARBAGE)
    expected = {w: n * (3 + (w.stage == "tts")) for w in workers}  # own inbox, events, control (+ tts_control)
    await until(lambda: all(w.bus_stats.undecodable == count for w, count in expected.items()))
    await until(lambda: stack.gateway.bus_stats.undecodable == n)
    await everything_works(stack)
    dropped = [r for r in caplog.records if "dropped an undecodable message" in r.getMessage()]
    assert {r.levelno for r in dropped} == {logging.WARNING, logging.DEBUG}  # the first warns, the rest are rate-limited
    assert SECRET not in caplog.text and "[[[[" not in caplog.text  # never the payload
    stats = {w["stage"]: w["stats"] for w in (await admin_get(stack, "/admin/workers"))["workers"]}
    assert stats["tts"]["bus_messages_undecodable"] == 4 * n


async def test_a_message_the_gateway_fails_on_is_counted_and_its_session_goes_on(stack, redis_client):
    ws, started = await connect(stack.ws_url)
    async with ws:
        # decodes, but a speech.stopped without a turn is nothing the session can account
        bad = SpeechStopped(conversation_id=started["conversation_id"], speech_end_ms=1, decided_ms=1, source="test")
        await redis_client.publish(stack.gateway.inbox, stack.gateway.bus.encode(bad))
        await until(lambda: stack.gateway.bus_stats.handler_failures == 1)
        await ws.send(json.dumps({"type": "text.input", "text": "Still with me?"}))
        events, audio = await collect_until(ws, "response.done", timeout=60)
    assert events[-1]["text"] and audio


async def test_a_broken_heartbeat_is_skipped(stack, redis_client):
    names = Names.from_settings(stack.settings)
    broken = {
        ("tts", "tts-not-json"): b'{"worker_id": "tts-not-json", "stage": ',
        ("tts", "tts-too-deep"): b"[" * 100_000,
        ("llm", "llm-wrong-types"): json.dumps({"worker_id": "llm-wrong-types", "stage": "llm", "last_heartbeat_ms": "now"}).encode(),
        ("llm", "llm-impostor"): json.dumps({"worker_id": "someone-else", "stage": "llm", "last_heartbeat_ms": now_ms()}).encode(),
        ("vad_stt", "vad-not-utf8"): b'{"worker_id": "\xff", "stage": "vad_stt", "last_heartbeat_ms": 1}',
    }
    for (stage, wid), raw in broken.items():
        await redis_client.set(names.worker(stage, wid), raw, px=60_000)
        await redis_client.zadd(names.workers(stage), {wid: now_ms() + 60_000})
    directory = stack.gateway.directory
    await directory.refresh()
    assert directory.skipped >= len(broken)
    assert not any(w.worker_id in {wid for _, wid in broken} for found in directory.workers.values() for w in found)
    await everything_works(stack)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{stack.http_url}/metrics")).status_code == 200
    assert (await admin_get(stack, "/admin/resources/stats"))["connections"]["total"] >= 2


@pytest.mark.parametrize("target", ["gateway", "tts"])
async def test_a_reader_that_dies_is_logged_and_restarted(stack, redis_client, monkeypatch, caplog, target):
    """A bug that escapes the per-message handling ends the reader loop; it is started again."""
    marker = b"this payload makes decode itself crash"
    real_decode = shared.bus.decode

    def buggy_decode(data):
        if data == marker:
            raise RuntimeError("a bug in the decoder")
        return real_decode(data)

    monkeypatch.setattr(shared.bus, "decode", buggy_decode)
    process = stack.gateway if target == "gateway" else stack.workers["tts"]
    name = "inbox" if target == "gateway" else "subscriber"
    await redis_client.publish(process.inbox, marker)
    await until(lambda: process.loop_restarts.get(name) == 1)
    assert any(r.levelno == logging.ERROR and f"loop {name} failed" in r.getMessage() for r in caplog.records)
    async with asyncio.timeout(10):  # the marker of the restarted reader: it reads its inbox again
        while process.bus_stats.undecodable == 0:
            await redis_client.publish(process.inbox, b"")
            await asyncio.sleep(0.05)
    await typed_turn(stack)


async def test_the_subscriber_counts_handler_failures_and_only_cancellation_stops_it(redis_client):
    channel = f"test-boundary-{now_ms()}"
    stats = SubscriberStats()
    handled: list[str] = []
    subscribed = asyncio.Event()

    async def handle(_channel, message):
        if message.text == "raise":
            raise ValueError("handler bug")
        if message.text == "recurse":
            raise RecursionError("deep")
        handled.append(message.text)

    async def on_subscribed():
        subscribed.set()

    reader = asyncio.create_task(run_subscriber(redis_client, [channel], handle, on_subscribed=on_subscribed, stats=stats))
    await asyncio.wait_for(subscribed.wait(), 10)
    for text in ("raise", "recurse", "after"):
        await redis_client.publish(channel, encode(TextInput(conversation_id="c", text=text)))
    await redis_client.publish(channel, b"[" * 50_000)
    await redis_client.publish(channel, encode(TextInput(conversation_id="c", text="last")))
    await until(lambda: handled == ["after", "last"])
    assert (stats.received, stats.undecodable, stats.handler_failures) == (5, 1, 2)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_workers_answer_introspection_right_behind_garbage_on_the_control_channel(stack, redis_client):
    """Garbage published just before each introspection request is handled (dropped) first, in order."""
    names = Names.from_settings(stack.settings)
    for round_ in range(1, 4):
        for data in GARBAGE:
            await redis_client.publish(names.control, data)
        workers = (await admin_get(stack, "/admin/workers"))["workers"]
        assert len(workers) == 3 and all(w["responding"] for w in workers)
        assert all(w["stats"]["bus_messages_undecodable"] == round_ * len(GARBAGE) for w in workers)
    ws, _ = await connect(stack.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_event(ws))["type"] == "pong"
