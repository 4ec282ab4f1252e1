"""Replica failure with real processes: two gateways and two processes per stage sharing one Redis;
replicas are killed with SIGKILL while conversations run (docs/protocol.md §1 "When a worker dies").

Typed turns and null-mode VAD/STT and TTS keep it fast (tests/support/replicas.py); the
orchestrators stream from a fake LLM that echoes how many earlier questions it was given, so a
conversation moved to another orchestrator shows that the new owner prepared from the history."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from shared.stages import STAGES
from tests.support.cluster import Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.replicas import REPLICA_SETTINGS, TURN_ENDING_ERRORS, Conversation

pytestmark = pytest.mark.e2e
TURN_TIMEOUT_S = 30  # a turn that has not ended by then hangs
REMEMBERED = re.compile(r"I remember (\d+) earlier questions")


@pytest.fixture
def echo_llm():
    with FakeLlmServer(FakeLlm(echo=True, token_delay_s=0.05)) as llm:
        yield llm


@pytest.fixture
def cluster(redis_url, echo_llm, tmp_path):
    running = Cluster(redis_url, echo_llm.base_url, tmp_path, settings=REPLICA_SETTINGS)
    yield running
    running.stop()


async def wait_routes_live(cluster: Cluster, ids: list[str], timeout: float = 15) -> dict[str, dict[str, str]]:
    """Until every conversation's lease names only live workers (the re-routes are done)."""
    async with asyncio.timeout(timeout):
        while True:
            live = await cluster.live_worker_ids()
            routes = await cluster.routes(ids)
            if all(route and all(route[stage] in live[stage] for stage in STAGES) for route in routes.values()):
                return routes
            await asyncio.sleep(0.1)


async def wait_clean(cluster: Cluster, ids: list[str], timeout: float = 15) -> None:
    """Until no live worker holds any of these conversations and only their history is left in Redis."""
    async with asyncio.timeout(timeout):
        for cid in ids:
            while True:
                state = await cluster.admin(0, f"/admin/conversations/{cid}")
                held = any(v for w in state["workers"] for v in w["holds"].values())
                if not state["connected"] and not held and all(k.endswith(":history") for k in state["redis_keys"]):
                    break
                await asyncio.sleep(0.05)


async def test_sigkill_one_replica_of_each_stage_while_24_conversations_run_over_two_gateways(cluster):
    for stage in STAGES:
        cluster.start_worker(stage)
        cluster.start_worker(stage)
    cluster.start_gateway()
    cluster.start_gateway()
    await cluster.wait_workers({stage: 2 for stage in STAGES})
    conversations = [await Conversation.open(cluster.ws_url(i % 2)) for i in range(24)]
    ids = [c.id for c in conversations]
    try:
        first = await asyncio.gather(*(c.turn("What is the capital of France?", TURN_TIMEOUT_S) for c in conversations))
        assert all(not r.errors and "I remember 0 earlier" in r.done["text"] for r in first), [r.errors for r in first]
        routes = await cluster.routes(ids)
        for stage in STAGES:  # both replicas of every stage serve some of them
            assert len({route[stage] for route in routes.values()}) == 2, routes

        # the second turn of all 24 under way, then one process of each stage killed
        replying = [asyncio.Event() for _ in conversations]
        second = [
            asyncio.create_task(c.turn("And of Italy?", TURN_TIMEOUT_S, first_delta=flag))
            for c, flag in zip(conversations, replying)
        ]
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while sum(flag.is_set() for flag in replying) < 12:
                await asyncio.sleep(0.01)
        for stage in STAGES:
            cluster.workers[stage][0].kill()
        outcomes = await asyncio.gather(*second)  # each ends (TimeoutError here is a hang)
        failed = [r for r in outcomes if r.errors]
        for r in outcomes:
            assert r.done is not None
            assert set(r.errors) <= TURN_ENDING_ERRORS, r.errors
            if not r.errors:
                assert "You said And of Italy?" in r.done["text"]
        assert failed, "no turn was in flight at a killed replica"
        assert all(r.errors == ["stage_failed"] for r in failed), [r.errors for r in failed]

        # every conversation is moved to the survivors, and its next turn works there
        await cluster.wait_workers({stage: 1 for stage in STAGES})
        routes = await wait_routes_live(cluster, ids)
        survivors = await cluster.live_worker_ids()
        assert all(route[stage] in survivors[stage] for route in routes.values() for stage in STAGES)
        third = await asyncio.gather(*(c.turn("And of Spain?", TURN_TIMEOUT_S) for c in conversations), return_exceptions=True)
        hung = [c.id for c, r in zip(conversations, third) if isinstance(r, BaseException)]
        assert not hung, (hung, routes)
        for r in third:
            assert not r.errors, r.errors
            assert "You said And of Spain?" in r.done["text"]
            assert int(REMEMBERED.search(r.done["text"]).group(1)) >= 1  # the new owner read the history
        stats = [await cluster.admin(i, "/admin/resources/stats") for i in range(2)]
        assert sum(s["rerouting"]["rerouted"] for s in stats) >= 12
    finally:
        await asyncio.gather(*(c.close() for c in conversations), return_exceptions=True)
    await wait_clean(cluster, ids)
    for gateway in cluster.gateways:
        assert gateway.process.poll() is None, gateway.log_path.read_text()[-3000:]
    for stage in STAGES:
        assert cluster.workers[stage][1].process.poll() is None, cluster.workers[stage][1].log_path.read_text()[-3000:]


async def test_last_replica_of_a_stage_killed_gives_stage_unavailable_at_once_and_readyz_503(cluster, echo_llm):
    for stage in STAGES:
        cluster.start_worker(stage)
    cluster.start_gateway()
    await cluster.wait_workers({stage: 1 for stage in STAGES})
    conversation = await Conversation.open(cluster.ws_url(0))
    try:
        assert not (await conversation.turn("What is the capital of France?", TURN_TIMEOUT_S)).errors
        echo_llm.token_delay_s = 0.5  # the next reply is still streaming when its orchestrator dies
        replying = asyncio.Event()
        in_flight = asyncio.create_task(conversation.turn("And of Italy?", TURN_TIMEOUT_S, first_delta=replying))
        async with asyncio.timeout(TURN_TIMEOUT_S):
            await replying.wait()
        cluster.workers["llm"][0].kill()
        lost = await in_flight
        assert lost.errors == ["stage_unavailable"] and lost.done is not None

        status, body = await cluster.readyz(0)
        assert status == 503 and body["missing"] == ["llm"], body
        # a turn tried now is answered at once: its error and response.done come before the pong
        await conversation.send_text("Anyone there?")
        await conversation.ws.send('{"type": "ping"}')
        events = []
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while not events or events[-1]["type"] != "pong":
                frame = await conversation.ws.recv()
                if isinstance(frame, str):
                    events.append(json.loads(frame))
        assert [e["type"] for e in events] == ["error", "response.done", "pong"], events
        assert events[0]["code"] == "stage_unavailable" and "llm" in events[0]["message"]
        assert events[1]["turn_id"] == events[0]["turn_id"] and events[1]["text"] == ""

        # a replica comes back: the conversation is routed to it and works again, history kept
        echo_llm.token_delay_s = 0.01
        cluster.start_worker("llm")
        await cluster.wait_workers({stage: 1 for stage in STAGES})
        await wait_routes_live(cluster, [conversation.id])
        back = await conversation.turn("And of Spain?", TURN_TIMEOUT_S)
        assert not back.errors and "You said And of Spain?" in back.done["text"]
        assert int(REMEMBERED.search(back.done["text"]).group(1)) >= 1
        assert (await cluster.readyz(0))[0] == 200
    finally:
        await conversation.close()
    await wait_clean(cluster, [conversation.id])


async def test_a_turn_sent_to_a_dead_replica_ends_at_once_and_moves_the_conversation(redis_url, echo_llm, tmp_path):
    """Heartbeats that would outlive the test (WORKER_TTL_S 30 s): only the lost message itself
    (no subscriber on the dead process's inbox) can end the turn and move the conversation."""
    cluster = Cluster(redis_url, echo_llm.base_url, tmp_path, settings={**REPLICA_SETTINGS, "worker_ttl_s": "30", "stale_timeout_s": "60"})
    try:
        cluster.start_worker("vad_stt")
        for _ in range(2):
            cluster.start_worker("llm")
            cluster.start_worker("tts")
        cluster.start_gateway()
        await cluster.wait_workers({"vad_stt": 1, "llm": 2, "tts": 2})
        conversation = await Conversation.open(cluster.ws_url(0))
        try:
            assert not (await conversation.turn("What is the capital of France?", TURN_TIMEOUT_S)).errors
            for stage in ("llm", "tts"):  # the gateway's text.input lost; then an orchestrator's piece of speech lost
                route = (await cluster.routes([conversation.id]))[conversation.id]
                victim = next(c for c in cluster.workers[stage] if f"-{c.process.pid}-" in route[stage])
                victim.kill()
                lost = await conversation.turn(f"Still there, {stage}?", TURN_TIMEOUT_S)
                assert lost.errors == ["stage_failed"] and lost.done is not None, (stage, lost.events)
                async with asyncio.timeout(10):  # moved, though the dead one's heartbeat is still fresh
                    while (await cluster.routes([conversation.id]))[conversation.id][stage] == route[stage]:
                        await asyncio.sleep(0.05)
                works = await conversation.turn(f"And now, {stage}?", TURN_TIMEOUT_S)
                assert not works.errors and f"You said And now, {stage}?" in works.done["text"], works.events
            stats = await cluster.admin(0, "/admin/resources/stats")
            assert stats["rerouting"]["rerouted"] == 2 and stats["rerouting"]["turns_failed"] == 2
        finally:
            await conversation.close()
    finally:
        cluster.stop()
