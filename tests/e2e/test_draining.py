"""Draining and rolling restarts, and resuming on another gateway, with every process real.

Gateways and two replicas of each stage run as child processes sharing one Redis
(tests/support/cluster.py); clients keep typing turns without pause while replicas get SIGTERM
(drain) or a gateway gets SIGKILL. The fake LLM echoes how many earlier questions it was given, so
every reply also proves the conversation's history survived the move."""
from __future__ import annotations

import asyncio
import json
import signal

import pytest
import redis.asyncio as aioredis

from tests.support.cluster import STAGES, Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.traffic import Talker

pytestmark = pytest.mark.e2e
CLIENTS = 4


@pytest.fixture
async def cluster(redis_url, tmp_path):
    with FakeLlmServer(FakeLlm(echo=True)) as llm:
        running = Cluster(redis_url, llm.base_url, tmp_path, settings={"history_max_messages": "100000", "history_max_chars": "10000000"})
        client = aioredis.Redis.from_url(redis_url)
        try:
            yield running, client
        finally:
            running.stop_all()
            await running.delete_keys(client)
            await client.aclose()


async def start_replicas(cluster: Cluster, client, per_stage: int) -> dict[str, list]:
    replicas = {stage: [cluster.start_worker(stage) for _ in range(per_stage)] for stage in STAGES}
    for stage, children in replicas.items():
        for child in children:
            await cluster.wait_heartbeat(client, stage, child)
    return replicas


async def drain(cluster: Cluster, client, stage: str, child) -> str:
    """SIGTERM one replica; it must exit 0. Returns its log."""
    child.signal(signal.SIGTERM)
    code = await child.wait_exit(30)
    log = child.log()
    assert code == 0, log[-3000:]
    assert "Shutdown cleanup completed" in log, log[-3000:]
    return log


def handed_off(log: str) -> int:
    line = next(line for line in log.splitlines() if "Shutdown cleanup completed" in line)
    return int(line.rsplit("handed_off=", 1)[1])


async def talk(gateway, count: int) -> tuple[list[Talker], asyncio.Event, list[asyncio.Task]]:
    talkers = [Talker(i, gateway.ws_url) for i in range(count)]
    for talker in talkers:
        await talker.connect()
        assert await talker.turn() is not None, talker.failures
    stop = asyncio.Event()
    tasks = [asyncio.create_task(t.talk_until(stop), name=f"talker-{t.index}") for t in talkers]
    return talkers, stop, tasks


async def until_turns(talkers: list[Talker], more: int, timeout: float = 60) -> None:
    """Wait until every client completed `more` further turns (a positive marker that traffic flows)."""
    goal = [t.turns_done + len(t.failures) + more for t in talkers]
    async with asyncio.timeout(timeout):
        while any(t.turns_done + len(t.failures) < g for t, g in zip(talkers, goal)):
            await asyncio.sleep(0.02)


async def stop_talking(talkers: list[Talker], stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for talker in talkers:
        await talker.aclose()


async def route_of(cluster: Cluster, client, talker: Talker) -> dict[str, str]:
    raw = await client.hgetall(cluster.names.conversation(talker.session["conversation_id"]))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_sigterm_drain_of_one_replica_under_traffic_fails_no_turn(cluster):
    cluster, client = cluster
    gateway = cluster.start_gateway()
    replicas = await start_replicas(cluster, client, 2)
    await cluster.wait_ready(gateway)
    talkers, stop, tasks = await talk(gateway, CLIENTS)
    try:
        # the orchestrator replica holding the first conversation: it certainly has work to hand off
        owner = (await route_of(cluster, client, talkers[0]))["llm"]
        victim = next(c for c in replicas["llm"] if f"-{c.pid}-" in owner)
        await until_turns(talkers, 2)
        log = await drain(cluster, client, "llm", victim)
        await until_turns(talkers, 3)
        routes = [await route_of(cluster, client, t) for t in talkers]
    finally:
        await stop_talking(talkers, stop, tasks)
    failures = [f for t in talkers for f in t.failures]
    assert failures == [], failures[:6]
    assert handed_off(log) >= 1, log[-3000:]
    assert all(route["llm"] != owner for route in routes), routes  # every conversation moved off it


async def test_rolling_restart_of_every_replica_of_every_stage_fails_no_turn(cluster):
    cluster, client = cluster
    gateway = cluster.start_gateway()
    replicas = await start_replicas(cluster, client, 2)
    await cluster.wait_ready(gateway)
    talkers, stop, tasks = await talk(gateway, CLIENTS)
    handed = 0
    try:
        for stage in STAGES:
            for old in list(replicas[stage]):
                await until_turns(talkers, 1)
                handed += handed_off(await drain(cluster, client, stage, old))
                fresh = cluster.start_worker(stage)
                await cluster.wait_heartbeat(client, stage, fresh)
                replicas[stage] = [c for c in replicas[stage] if c is not old] + [fresh]
        await until_turns(talkers, 2)
    finally:
        await stop_talking(talkers, stop, tasks)
    failures = [f for t in talkers for f in t.failures]
    assert failures == [], failures
    assert handed >= len(STAGES), "the restarted replicas handed off no conversation: the test proved nothing"
    assert all(t.turns_done >= 8 for t in talkers), [t.turns_done for t in talkers]


async def test_resume_on_the_other_gateway_after_a_gateway_sigkill(cluster):
    cluster, client = cluster
    first, second = cluster.start_gateway(), cluster.start_gateway()
    await start_replicas(cluster, client, 1)
    await cluster.wait_ready(first)
    await cluster.wait_ready(second)
    talker = Talker(0, first.ws_url)
    await talker.connect()
    assert await talker.turn() is not None, talker.failures
    before = await route_of(cluster, client, talker)

    first.signal(signal.SIGKILL)
    assert await first.wait_exit(10) == -signal.SIGKILL
    resumed = await talker.resume_on(second.ws_url)
    assert resumed["resumed"] is True and resumed["conversation_id"] == talker.session["conversation_id"]
    # it did not wait for an answer from the dead gateway
    assert "previous gateway is gone" in second.log(), second.log()[-3000:]
    after = await route_of(cluster, client, talker)
    assert after["gateway"] != before["gateway"] and after["connection_id"] != before["connection_id"]

    # the next turn is answered there, by workers that now deliver to the second gateway, with the history
    reply = await talker.turn()
    assert reply is not None, talker.failures
    assert "I remember 1 earlier questions" in reply
    assert await talker.turn() is not None, talker.failures
    await talker.aclose()


async def test_a_turn_still_running_at_the_drain_timeout_ends_with_stage_failed_and_the_next_works(redis_url, tmp_path):
    """A reply that never finishes (the LLM stalls) is cut at `DRAIN_TIMEOUT_S`: the client gets
    `error` `stage_failed` and `response.done` for it, the worker exits 0, and the conversation
    goes on on the other replica with its history."""
    llm = FakeLlm(echo=True)
    with FakeLlmServer(llm):
        cluster = Cluster(redis_url, llm.base_url, tmp_path, settings={"drain_timeout_s": "1"})
        client = aioredis.Redis.from_url(redis_url)
        try:
            gateway = cluster.start_gateway()
            replicas = await start_replicas(cluster, client, 2)
            await cluster.wait_ready(gateway)
            talker = Talker(0, gateway.ws_url)
            await talker.connect()
            assert await talker.turn() is not None, talker.failures
            owner = (await route_of(cluster, client, talker))["llm"]
            victim = next(c for c in replicas["llm"] if f"-{c.pid}-" in owner)

            llm.stall_after = 2
            await talker.ws.send('{"type": "text.input", "text": "this reply stalls"}')
            async with asyncio.timeout(30):  # the reply is under way on the victim
                while len(llm.streams) < 2 or llm.streams[-1].tokens_sent < 2:
                    await asyncio.sleep(0.01)
            victim.signal(signal.SIGTERM)
            events = []
            async with asyncio.timeout(30):
                while not events or events[-1]["type"] != "response.done":
                    frame = await talker.ws.recv()
                    if isinstance(frame, str):
                        events.append(json.loads(frame))
            assert [e["code"] for e in events if e["type"] == "error"] == ["stage_failed"], events
            llm.stall_after = None
            assert await victim.wait_exit(30) == 0, victim.log()[-3000:]
            assert handed_off(victim.log()) == 1 and "at the drain timeout" in victim.log()
            talker.resync = True  # the cut turn is not in the history
            reply = await talker.turn()
            assert reply is not None and "I remember 1 earlier questions" in reply, talker.failures
            assert (await route_of(cluster, client, talker))["llm"] != owner
            await talker.aclose()
        finally:
            cluster.stop_all()
            await cluster.delete_keys(client)
            await client.aclose()
