"""A Redis restart under a live stack (issue 9, item 1): the test's own redis-server, killed with
SIGKILL and started again on the same port with nothing kept, under the real gateway and workers.

No process dies, no turn hangs: a turn in flight ends with `error` `bus_unavailable` and
`response.done`, the conversation's routing is written again, and the next turn on the same socket
is answered. While Redis is down a new socket is refused with 503 before the upgrade and `/readyz`
names redis. Every wait is bounded; "nothing else happens" is never waited out with a sleep."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from shared.bus import create_redis, run_subscriber
from shared.channels import Names
from shared.messages import TextInput
from shared.messages.codec import encode
from shared.stages import STAGES
from tests.conftest import make_settings
from tests.support.cluster import Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.redis_server import RedisProcess
from tests.support.stack import run_stack
from tests.support.stack import wait_ready as stack_wait_ready
from tests.support.ws import collect_until, connect, next_event, refused_status
from voicepipe.client import SessionRefused

TURN_TIMEOUT_S = 30.0  # generous: a loaded 2-core machine; a hang is what this bounds, not speed


@pytest.fixture
def own_redis():
    server = RedisProcess()
    yield server
    server.stop()


@pytest.fixture
def slow_llm():
    """A reply of 40 tokens, 0.1 s apart: long enough to kill Redis in the middle of it."""
    with FakeLlmServer(FakeLlm(reply=" ".join(f"word{i}." for i in range(40)), token_delay_s=0.1)) as llm:
        yield llm


def settings_on(server: RedisProcess, **overrides):
    return make_settings(server.url, null_mode=True, **overrides)


async def turn(ws, text: str = "Are you still there?") -> list[dict]:
    await ws.send(json.dumps({"type": "text.input", "text": text}))
    events, _ = await collect_until(ws, "response.done", timeout=TURN_TIMEOUT_S)
    return events


async def answered_turn(ws, text: str = "Are you still there?", attempts: int = 5) -> list[dict]:
    """A turn that is answered: one that ends with `bus_unavailable` (the bus was still settling)
    is asked again, as a client would; any other error fails the test."""
    for _ in range(attempts):
        events = await turn(ws, text)
        errors = [e["code"] for e in events if e["type"] == "error"]
        if not errors:
            assert events[-1]["text"], events
            return events
        assert errors == ["bus_unavailable"], events
    raise AssertionError(f"no turn answered in {attempts} attempts: {events}")


def assert_all_running(stack) -> None:
    """Every worker's run() and the gateway's server are still going (no process of the stack died)."""
    for stage, worker in stack.workers.items():
        assert not worker.closing, f"{stage} worker shut down"
    assert not stack.server.should_exit and stack.server.started


async def wait_ready(stack, timeout: float = 20.0) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=5) as client, asyncio.timeout(timeout):
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)


async def test_commands_on_pooled_connections_survive_a_restart(own_redis):
    """Every pooled connection is stale after a restart; the first command on each is retried on a
    new connection instead of failing with `Connection closed by server`."""
    client = create_redis(own_redis.url, max_connections=8)
    try:
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(8)))  # eight connections in the pool
        assert len(client.connection_pool._available_connections) == 8
        own_redis.kill()
        own_redis.start()
        assert await asyncio.gather(*(client.get(f"k{i}") for i in range(8))) == [None] * 8  # nothing was kept
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("after", 1).get("after")
            assert await pipe.execute() == [True, b"1"]
    finally:
        await client.aclose()


@pytest.mark.parametrize("down_s", [0.0, 1.5])
async def test_the_subscriber_reports_the_loss_and_catches_up(own_redis, down_s):
    """Restarted at once, redis-py renews the subscription inside its retries (seen only as a new
    subscribe confirmation); down for longer, the error reaches the loop. Either way the owner
    hears `on_lost` then `on_subscribed`, and messages flow again."""
    client = create_redis(own_redis.url)
    calls: list[str] = []
    texts: list[str] = []

    async def handle(_channel, message):
        texts.append(message.text)

    async def on_subscribed():
        calls.append("subscribed")

    async def on_lost():
        calls.append("lost")

    reader = asyncio.create_task(
        run_subscriber(client, ["restart-test"], handle, on_subscribed=on_subscribed, on_lost=on_lost)
    )
    try:
        async with asyncio.timeout(10):
            while calls != ["subscribed"]:
                await asyncio.sleep(0.01)
        own_redis.kill()
        await asyncio.sleep(down_s)
        own_redis.start()
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while calls[-2:] != ["lost", "subscribed"]:
                await asyncio.sleep(0.01)
            while not texts:
                await client.publish("restart-test", encode(TextInput(conversation_id="c", text="back")))
                await asyncio.sleep(0.05)
        assert calls == ["subscribed", "lost", "subscribed"] and texts[0] == "back"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.aclose()


async def test_a_restart_between_turns_keeps_the_conversation(own_redis, fake_llm):
    settings = settings_on(own_redis)
    async with run_stack(settings, llm_base_url=fake_llm.base_url) as stack:
        ws, started = await connect(stack.ws_url)
        async with ws:
            assert (await turn(ws))[-1]["text"]
            own_redis.kill()
            own_redis.start()  # at once: every pooled and subscribed connection is stale
            await answered_turn(ws)
            names = Names.from_settings(settings)
            probe = create_redis(own_redis.url)
            try:  # the routing lost with Redis was written again, as it was
                route = await probe.hgetall(names.conversation(started["conversation_id"]))
                assert route[b"connection_id"].decode() == stack.gateway.conversations[started["conversation_id"]].route.connection_id
                assert {route[stage.encode()].decode() for stage in STAGES} == {w.worker_id for w in stack.workers.values()}
            finally:
                await probe.aclose()
            assert (await turn(ws))[-1]["text"]  # and again, with nothing to settle
        assert_all_running(stack)
        # between conversations: four opened at once after another restart are all answered
        own_redis.kill()
        own_redis.start()

        async def conversation() -> None:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while True:
                    try:
                        ws, _ = await connect(stack.ws_url)
                        break
                    except (websockets.InvalidStatus, SessionRefused):  # 503 or not_ready while it settles
                        await asyncio.sleep(0.05)
            async with ws:
                await answered_turn(ws)

        await asyncio.gather(*(conversation() for _ in range(4)))
        assert_all_running(stack)


async def test_a_turn_in_flight_ends_with_bus_unavailable_and_the_next_is_answered(own_redis, slow_llm):
    settings = settings_on(own_redis)
    async with run_stack(settings, llm_base_url=slow_llm.base_url) as stack:
        ws, _ = await connect(stack.ws_url)
        async with ws:
            await ws.send(json.dumps({"type": "text.input", "text": "Tell me a long story."}))
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while (event := await next_event(ws, TURN_TIMEOUT_S))["type"] != "response.text.delta":
                    pass
            turn_id = event["turn_id"]
            own_redis.kill()
            # while Redis is down: the turn ends for the client, with the reason
            events, _ = await collect_until(ws, "response.done", timeout=TURN_TIMEOUT_S)
            errors = [e for e in events if e["type"] == "error"]
            assert [(e["code"], e["turn_id"]) for e in errors] == [("bus_unavailable", turn_id)]
            assert events[-1]["turn_id"] == turn_id
            # audio sent now is dropped, and the client is told so, once
            await ws.send(bytes(640))
            await ws.send(bytes(640))
            await ws.send(json.dumps({"type": "ping"}))
            events, _ = await collect_until(ws, "pong", timeout=TURN_TIMEOUT_S)
            assert [(e["type"], e.get("code")) for e in events] == [("error", "bus_unavailable"), ("pong", None)]
            # a socket opened now is refused before the upgrade, and /readyz says why
            status, headers = await refused_status(stack.ws_url)
            assert status == 503 and headers["retry-after"] == "1"
            async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["missing"] == ["redis"]
                own_redis.start()
                await wait_ready(stack)
            slow_llm.token_delay_s = 0.0
            events = await answered_turn(ws, "And now?")
            assert all(e.get("turn_id") != turn_id for e in events)  # nothing more of the lost turn
            await ws.send(json.dumps({"type": "ping"}))
            assert (await next_event(ws))["type"] == "pong"
        assert_all_running(stack)
        assert stack.gateway.recovery.turns_failed >= 1


async def test_a_socket_opened_while_redis_is_down_gets_503_then_connects(own_redis, fake_llm):
    settings = settings_on(own_redis)
    async with run_stack(settings, llm_base_url=fake_llm.base_url) as stack:
        own_redis.kill()
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while not stack.gateway.bus_health.outages:
                await asyncio.sleep(0.02)
        status, _ = await refused_status(stack.ws_url)
        assert status == 503
        assert stack.gateway.stats.rejected_by.get("bus_unavailable", 0) >= 1
        own_redis.start()
        await wait_ready(stack)
        ws, _ = await connect(stack.ws_url)
        async with ws:
            await answered_turn(ws)
        assert_all_running(stack)


async def test_real_processes_survive_a_restart_mid_conversation_and_between_conversations(own_redis, tmp_path):
    """The gateway and one worker per stage as processes of their own (null models, and the fake
    LLM for the orchestrator): Redis killed during a reply, down for a second, started again; then
    killed and started again between two conversations. Every process is still running at the end
    and every turn ended."""
    llm = FakeLlm(reply=" ".join(f"word{i}." for i in range(40)), token_delay_s=0.1)
    with FakeLlmServer(llm):
        cluster = Cluster(own_redis.url, llm.base_url, tmp_path)
        try:
            for stage in STAGES:
                cluster.start_worker(stage)
            gateway = cluster.start_gateway()
            http_url, ws_url = gateway.http_url, gateway.ws_url
            await stack_wait_ready(http_url, timeout=60)
            ws, _ = await connect(ws_url)
            async with ws:
                await ws.send(json.dumps({"type": "text.input", "text": "Tell me a long story."}))
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    while (await next_event(ws, TURN_TIMEOUT_S))["type"] != "response.text.delta":
                        pass
                own_redis.kill()
                events, _ = await collect_until(ws, "response.done", timeout=TURN_TIMEOUT_S)
                assert [e["code"] for e in events if e["type"] == "error"] == ["bus_unavailable"]
                own_redis.start()
                llm.token_delay_s = 0.0
                await answered_turn(ws)
            # between conversations: the next one, opened after the restart, is answered
            own_redis.kill()
            own_redis.start()
            await stack_wait_ready(http_url, timeout=TURN_TIMEOUT_S)
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while True:
                    try:
                        ws, _ = await connect(ws_url)
                        break
                    except (websockets.InvalidStatus, SessionRefused):  # 503 or not_ready while it settles
                        await asyncio.sleep(0.05)
            async with ws:
                await answered_turn(ws)
            dead = {child.name: child.process.returncode for child in cluster.children if not child.alive()}
            assert not dead, cluster.logs()
        finally:
            cluster.stop()
