"""The connection lifecycle (docs/protocol.md §2): however a socket ends, every worker lets go at once."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import websockets

from shared.clock import now_ms
from shared.messages import ConnectionDisconnected, TextInput
from shared.messages.codec import decode, encode
from tests.conftest import make_settings
from tests.support.admin import admin_get, wait_clean
from tests.support.stack import run_stack
from tests.support.ws import collect_until, connect, next_event, wait_closed
from voicepipe.client import VoiceClient
from voicepipe.simulate import PHASE_TRIGGERS, run_until
from voicepipe.wavio import read_audio_16k_mono

SPEECH = read_audio_16k_mono(Path(__file__).parent.parent / "fixtures" / "capital.wav")


async def disconnect_events(redis_client, channel):
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(channel)
    return pubsub


async def next_disconnect(pubsub, conversation_id: str, timeout: float = 10) -> dict:
    return (await disconnects_of(pubsub, {conversation_id}, timeout))[conversation_id]


async def disconnects_of(pubsub, conversation_ids: set[str], timeout: float = 10) -> dict[str, dict]:
    """The connection_disconnected event of each conversation, in whatever order they come."""
    found: dict[str, dict] = {}
    async with asyncio.timeout(timeout):
        while not conversation_ids <= found.keys():
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if raw is not None:
                event = json.loads(raw["data"])
                found.setdefault(event["conversation_id"], event)
    return found


@pytest.mark.parametrize("way", ["close", "drop"])
@pytest.mark.parametrize("phase", ["listening", "transcribing", "generating", "speaking"])
async def test_every_phase_and_way_leaves_nothing_behind(stack, fake_llm, redis_client, settings, phase, way):
    fake_llm.token_delay_s = 0.05  # slow enough that generating and speaking are caught
    events = await disconnect_events(redis_client, settings.connection_events_channel)
    client = await VoiceClient(stack.ws_url).open()
    cid = client.conversation_id
    assert await run_until(client, SPEECH, PHASE_TRIGGERS[phase], realtime=False)
    closing = client.drop(way)
    event = await next_disconnect(events, cid)
    assert event["reason"] == "client_disconnect"
    seconds, state = await wait_clean(stack, cid)
    assert state["redis_keys"] == [f"{settings.namespace}:conv:{cid}:history"]
    assert {w["stage"] for w in state["workers"]} == {"vad_stt", "llm", "tts"}
    assert all(v == 0 for w in state["workers"] for v in w["holds"].values())
    for worker in stack.workers.values():
        assert cid not in worker.conversation_ids()
    if closing is not None:
        closing.cancel()  # the client stopped reading, so its side of the close handshake may never finish
    await events.aclose()


async def test_nothing_is_published_for_a_conversation_after_its_cleanup(stack, fake_llm, redis_client, settings):
    """The orphan test: listen to every channel once cleanup is done; a slow LLM would still be talking."""
    fake_llm.token_delay_s = 0.1
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    await ws.send(json.dumps({"type": "text.input", "text": "Tell me everything."}))
    assert (await next_event(ws))["type"] == "response.text.delta"
    await ws.close()
    await wait_clean(stack, cid)
    pubsub = redis_client.pubsub()
    await pubsub.psubscribe(f"{settings.namespace}:*")
    await pubsub.subscribe(settings.connection_events_channel, settings.tts_control_channel)
    heard = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if raw is not None and decode(raw["data"]).conversation_id == cid:
            heard.append(decode(raw["data"]).type)
    await pubsub.aclose()
    assert heard == []
    assert not fake_llm.streams[-1].completed


async def test_a_silent_client_is_ended_by_the_ping_timeout(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, ping_interval_s=0.3, ping_timeout_s=0.3)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        events = await disconnect_events(redis_client, settings.connection_events_channel)
        client = await VoiceClient(stack.ws_url).open()
        cid = client.conversation_id
        client.drop("silent")
        event = await next_disconnect(events, cid, timeout=10)
        assert event["reason"] == "timeout"  # the ping timeout ended it, not the client
        await wait_clean(stack, cid)
        client.abort()
        await events.aclose()


async def test_a_worker_that_missed_the_event_still_cleans_up(redis_url, redis_client, transcriber, voice, fake_llm):
    """CLIENT KILL the orchestrator's Redis links around the disconnect: the event may be lost, the
    sweep still cleans within the stale timeout."""
    settings = make_settings(redis_url, stale_timeout_s=1.5)
    fake_llm.token_delay_s = 0.2
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        llm = stack.workers["llm"]
        ws, started = await connect(stack.ws_url)
        cid = started["conversation_id"]
        await ws.send(json.dumps({"type": "text.input", "text": "Keep talking."}))
        assert (await next_event(ws))["type"] == "response.text.delta"
        assert cid in llm.conversation_ids()
        killer = asyncio.create_task(_keep_killing(redis_client, f"{settings.namespace}-llm", 0.3))
        await ws.close()
        closed = time.monotonic()
        async with asyncio.timeout(settings.stale_timeout_s + 1):
            while cid in llm.conversation_ids():
                await asyncio.sleep(0.01)
        assert time.monotonic() - closed <= settings.stale_timeout_s
        await killer
        await wait_clean(stack, cid)


async def _keep_killing(client, name: str, seconds: float) -> None:
    """CLIENT KILL every connection named `name`, again and again, for `seconds`."""
    deadline = time.monotonic() + seconds
    killed = 0
    while time.monotonic() < deadline:
        for entry in await client.client_list():
            if entry.get("name") == name:
                killed += await client.client_kill_filter(_id=entry["id"])
        await asyncio.sleep(0.005)
    assert killed > 0


async def test_a_missed_event_is_caught_by_the_sweep(redis_url, redis_client, transcriber, voice, fake_llm):
    """The gateway removed the lease but its event never arrived (pub/sub is at-most-once)."""
    settings = make_settings(redis_url, stale_timeout_s=1.5)
    fake_llm.token_delay_s = 0.5
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        await _missed_event(stack, fake_llm, redis_client, settings)


async def _missed_event(stack, fake_llm, redis_client, settings):
    llm = stack.workers["llm"]
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    await ws.send(json.dumps({"type": "text.input", "text": "Keep talking."}))
    assert (await next_event(ws))["type"] == "response.text.delta"
    # what the gateway does just before publishing, once it is ending the socket (it no longer
    # keeps the lease then; a lease gone under a live socket is written again: gateway/recovery.py)
    stack.gateway.conversations[cid]._ended.set()
    await redis_client.delete(f"{settings.namespace}:conv:{cid}")
    async with asyncio.timeout(llm.sweep_interval_s + 1):
        while cid in llm.conversation_ids():
            await asyncio.sleep(0.01)
    assert llm.stats.stale_cleaned == 1
    assert fake_llm.streams[-1].ended is not None and not fake_llm.streams[-1].completed
    await ws.close()


async def test_a_dead_gateways_conversation_is_ended_by_the_stale_sweep(stack, fake_llm, redis_client, settings):
    """A lease that expired without any event: a gateway's sweep publishes it, reason timeout."""
    fake_llm.token_delay_s = 0.2
    cid = "0b5e1d7e-0000-4000-8000-000000000001"
    route = {
        "gateway": "gateway-that-died", "vad_stt": stack.workers["vad_stt"].worker_id,
        "llm": stack.workers["llm"].worker_id, "tts": stack.workers["tts"].worker_id,
        "correlation_id": "dead-gw", "connection_id": "c1",
    }
    await redis_client.hset(f"{settings.namespace}:conv:{cid}", mapping=route)
    await redis_client.zadd(f"{settings.namespace}:live", {cid: now_ms() - 1})
    events = await disconnect_events(redis_client, settings.connection_events_channel)
    inbox = f"{settings.namespace}:inbox:llm:{stack.workers['llm'].worker_id}"
    await redis_client.publish(inbox, encode(TextInput(conversation_id=cid, turn_id="t1", text="Hello?")))
    async with asyncio.timeout(2):
        while cid not in stack.workers["llm"].conversation_ids():
            await asyncio.sleep(0.01)
    await redis_client.delete(f"{settings.namespace}:conv:{cid}")  # the lease expires
    await stack.gateway.sweep_stale()
    event = await next_disconnect(events, cid)
    assert event["reason"] == "timeout" and event["detail"] == "stale"
    async with asyncio.timeout(2):
        while cid in stack.workers["llm"].conversation_ids():
            await asyncio.sleep(0.01)
    assert await stack.gateway.sweep_stale() == 0  # published once only
    await events.aclose()


async def test_repeated_and_unknown_events_are_harmless(stack, redis_client, settings):
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    await ws.close()
    await wait_clean(stack, cid)
    for conversation_id in (cid, cid, "never-seen"):
        event = ConnectionDisconnected(conversation_id=conversation_id, reason="client_disconnect")
        await redis_client.publish(settings.connection_events_channel, encode(event))
    external = {"type": "connection_disconnected", "conversation_id": "x", "timestamp_ms": 1, "reason": "timeout"}
    await redis_client.publish(settings.connection_events_channel, json.dumps(external))
    await redis_client.publish(settings.connection_events_channel, b"garbage")
    await asyncio.sleep(0.2)
    workers = (await admin_get(stack, "/admin/workers"))["workers"]
    assert len(workers) == 3 and all(w["responding"] and w["conversations"] == 0 for w in workers)
    ws, _ = await connect(stack.ws_url)  # still serving
    await ws.send(json.dumps({"type": "ping"}))
    assert (await next_event(ws))["type"] == "pong"
    await ws.close()


async def test_resume_keeps_the_history_and_a_bad_pair_gets_4404(stack, fake_llm):
    fake_llm.echo = True
    ws, started = await connect(stack.ws_url)
    await ws.send(json.dumps({"type": "text.input", "text": "My name is Ada."}))
    await collect_until(ws, "response.done")
    await ws.close()
    cid, token = started["conversation_id"], started["resume_token"]
    await wait_clean(stack, cid)

    ws, resumed = await connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={token}")
    assert resumed["resumed"] is True and resumed["conversation_id"] == cid
    await ws.send(json.dumps({"type": "text.input", "text": "What is my name?"}))
    events, _ = await collect_until(ws, "response.done")
    assert events[-1]["text"] == "You said What is my name?. I remember 1 earlier questions."
    assert fake_llm.streams[-1].messages[1] == {"role": "user", "content": "My name is Ada."}
    await ws.close()

    for query in (f"conversation_id={cid}&resume_token=wrong", "conversation_id=nope&resume_token=x", f"conversation_id={cid}"):
        bad = await websockets.connect(f"{stack.ws_url}?{query}")
        error = json.loads(await asyncio.wait_for(bad.recv(), 5))
        assert error["type"] == "error" and error["code"] == "unknown_conversation"
        assert await wait_closed(bad) == 4404


async def test_resume_takes_over_a_socket_that_is_still_open(stack, fake_llm):
    old, started = await connect(stack.ws_url)
    cid, token = started["conversation_id"], started["resume_token"]
    new, resumed = await connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={token}")
    assert resumed["resumed"] is True
    assert await wait_closed(old) == 1000
    await new.send(json.dumps({"type": "text.input", "text": "Still there?"}))
    events, audio = await collect_until(new, "response.done")
    assert events[-1]["text"] == fake_llm.reply and audio
    await new.close()
    await wait_clean(stack, cid)


async def test_resume_after_the_window_is_refused(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url, resume_window_s=1)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        ws, started = await connect(stack.ws_url)
        await ws.close()
        await asyncio.sleep(2.2)
        bad = await websockets.connect(
            f"{stack.ws_url}?conversation_id={started['conversation_id']}&resume_token={started['resume_token']}"
        )
        assert await wait_closed(bad) == 4404


async def test_server_shutdown_closes_1001_and_publishes_every_disconnect(redis_url, redis_client, transcriber, voice, fake_llm):
    settings = make_settings(redis_url)
    events = await disconnect_events(redis_client, settings.connection_events_channel)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        clients = [await connect(stack.ws_url) for _ in range(3)]
        stack.server.should_exit = True
        codes = [await wait_closed(ws) for ws, _ in clients]
        assert codes == [1001, 1001, 1001]
        found = await disconnects_of(events, {started["conversation_id"] for _, started in clients})
        for event in found.values():
            assert event["reason"] == "server_error" and event["detail"] == "shutdown"
    summary = stack.gateway.stats.last_shutdown_cleanup  # recorded once the shutdown has finished
    assert (summary["cleaned"], summary["before"], summary["after"], summary["iterations"]) == (3, 3, 0, 1)
    assert summary["max_iterations_reached"] is False
    await events.aclose()


async def test_admin_routes_need_a_key_and_report_live(stack, fake_llm, redis_client, settings):
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        for path in ("/admin/workers", "/admin/resources/pools", "/admin/resources/stats", "/admin/conversations/x"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers={"X-API-Key": "nope"})).status_code == 401
    ws, started = await connect(stack.ws_url)
    await ws.send(json.dumps({"type": "text.input", "text": "Hello"}))
    await collect_until(ws, "response.done")
    workers = (await admin_get(stack, "/admin/workers"))["workers"]
    assert sorted(w["stage"] for w in workers) == ["llm", "tts", "vad_stt"]
    assert all(w["conversations"] == 1 and w["last_heartbeat_ms"] > 0 for w in workers if w["stage"] != "vad_stt")
    state = await admin_get(stack, f"/admin/conversations/{started['conversation_id']}")
    assert state["connected"] is True
    assert f"{settings.namespace}:conv:{started['conversation_id']}" in state["redis_keys"]
    llm_holds = next(w["holds"] for w in state["workers"] if w["stage"] == "llm")
    assert llm_holds["conversation"] == 1
    pools = await admin_get(stack, "/admin/resources/pools")
    assert {"max_connections", "in_use", "available", "created"} <= set(pools["redis"])
    llm_pools = next(w for w in pools["workers"] if w["stage"] == "llm")
    assert llm_pools["llm_http"]["created"] >= 1
    await ws.close()
    await wait_clean(stack, started["conversation_id"])
    stats = await admin_get(stack, "/admin/resources/stats")
    assert stats["connections"]["total"] == 1 and stats["connections"]["current"] == 0
    assert stats["disconnect_events"]["published"] == 1 and stats["disconnect_events"]["publish_failures"] == 0
    assert stats["uptime_s"] >= 0 and "stale_cleanup" in stats and "last_shutdown_cleanup" in stats
    # a worker that stops answering is reported, not hidden
    ghost = {"worker_id": "tts-ghost", "stage": "tts", "last_heartbeat_ms": now_ms(), "conversations": 0}
    await redis_client.set(f"{settings.namespace}:worker:tts:tts-ghost", json.dumps(ghost), px=5000)
    await redis_client.zadd(f"{settings.namespace}:workers:tts", {"tts-ghost": now_ms()})
    workers = (await admin_get(stack, "/admin/workers"))["workers"]
    assert {"worker_id": "tts-ghost", "responding": False}.items() <= next(w for w in workers if w["worker_id"] == "tts-ghost").items()
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        metrics = (await client.get("/metrics")).text
    assert "voicepipe_connections_accepted_total 1.0" in metrics and "\nvoicepipe_connections 0.0" in metrics
    assert 'voicepipe_disconnect_events_published_total{reason="client_disconnect"} 1.0' in metrics
    assert "voicepipe_worker_" not in metrics  # workers serve their own page (tests/integration/test_metrics.py)


async def test_every_worker_prepares_when_the_socket_opens(stack, fake_llm, redis_client, settings):
    """`conversation.opened`: each routed worker holds the conversation before the first word,
    the orchestrator with the history of a resumed one; an announcement for an ended socket opens nothing."""
    fake_llm.echo = True
    announcements = redis_client.pubsub()
    await announcements.subscribe(stack.workers["llm"].inbox)
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    opened = await _next_of_type(announcements, "conversation.opened")
    assert opened.conversation_id == cid and opened.connection_id
    for stage, worker in stack.workers.items():
        await _until(lambda: cid in worker.conversation_ids(), f"{stage} did not prepare")
    await ws.send(json.dumps({"type": "text.input", "text": "My name is Ada."}))
    await collect_until(ws, "response.done")
    await ws.close()
    await wait_clean(stack, cid)

    # a late or replayed announcement for the ended socket is fenced
    await redis_client.publish(stack.workers["llm"].inbox, encode(opened))
    await redis_client.publish(stack.workers["tts"].inbox, encode(opened))
    await asyncio.sleep(0.3)
    assert all(cid not in worker.conversation_ids() for worker in stack.workers.values())

    ws, _ = await connect(f"{stack.ws_url}?conversation_id={cid}&resume_token={started['resume_token']}")
    llm = stack.workers["llm"]
    await _until(lambda: cid in llm.conversation_ids(), "llm did not prepare the resumed conversation")
    assert llm.conversations[cid].history == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "You said My name is Ada.. I remember 0 earlier questions."},
    ]
    await ws.close()
    await wait_clean(stack, cid)
    await announcements.aclose()


async def test_workers_that_missed_the_opening_admit_from_the_live_routing(stack, monkeypatch):
    """Without `conversation.opened` (missed, or the worker restarted) a spoken turn still works:
    each worker admits the conversation from its routing lease at its first message."""

    async def missed(message) -> None:
        return None

    for worker in stack.workers.values():
        monkeypatch.setattr(worker, "_open", missed)
    ws, started = await connect(stack.ws_url)
    cid = started["conversation_id"]
    await asyncio.sleep(0.2)
    assert all(cid not in worker.conversation_ids() for worker in stack.workers.values())
    for offset in range(0, len(SPEECH), 640):
        await ws.send(SPEECH[offset : offset + 640])
    await ws.send(bytes(16000))  # half a second of silence ends the utterance
    events, _ = await collect_until(ws, "response.done", timeout=30)
    types = [e["type"] for e in events]
    assert "transcript.final" in types and "response.audio.started" in types
    assert all(cid in worker.conversation_ids() for worker in stack.workers.values())
    await ws.close()
    await wait_clean(stack, cid)


async def _next_of_type(pubsub, type_: str, timeout: float = 5):
    async with asyncio.timeout(timeout):
        while True:
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if raw is not None and (message := decode(raw["data"])).type == type_:
                return message


async def _until(condition, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)
