"""Routing of new conversations over replicas, on the real directory with real heartbeats: two
gateways and two workers of each stage (null models) in this process, sharing a real Redis."""
from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from types import SimpleNamespace

from gateway.admin import workers as admin_workers
from gateway.hub import Gateway
from shared.bus import create_redis
from shared.route import Route
from shared.stages import STAGES
from workers.llm_orchestrator.handler import LlmWorker
from workers.tts.handler import TtsWorker
from workers.vad_stt.handler import VadSttWorker

MAKERS = {"vad_stt": VadSttWorker, "llm": LlmWorker, "tts": TtsWorker}


@contextlib.asynccontextmanager
async def replicas(settings, per_stage: int = 2, gateways: int = 2):
    settings = settings.model_copy(update={"null_mode": True, "heartbeat_interval_s": 0.1})
    clients, tasks = [], []

    def client():
        clients.append(create_redis(settings.redis_url_or_default))
        return clients[-1]

    workers = {stage: [MAKERS[stage](settings, client()) for _ in range(per_stage)] for stage in STAGES}
    hubs = [Gateway(settings, client()) for _ in range(gateways)]
    try:
        tasks = [asyncio.create_task(w.run()) for found in workers.values() for w in found]
        for hub in hubs:
            await hub.start()
        async with asyncio.timeout(10):
            for hub in hubs:
                while any(len(hub.directory.live(stage)) < per_stage for stage in STAGES):
                    await asyncio.sleep(0.02)
        yield workers, hubs
    finally:
        for hub in hubs:
            await hub.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()


async def open_many(hubs, n: int) -> list[Route]:
    """n conversations opened at once over the gateways, each after a random pause of up to 0.5 s
    (several heartbeats), so the gateways see each other's assignments only through heartbeats."""

    async def one(i: int) -> Route:
        await asyncio.sleep(random.uniform(0, 0.5))
        route, _token = await hubs[i % len(hubs)].open_conversation(str(uuid.uuid4()), "corr-routing")
        return route

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_40_conversations_split_over_2_replicas_within_20_percent(settings, redis_client):
    async with replicas(settings) as (workers, hubs):
        routes = await open_many(hubs, 40)
        async with asyncio.timeout(5):  # every announcement taken: each worker holds what it was given
            while sum(len(w.conversation_ids()) for w in workers["llm"]) < 40:
                await asyncio.sleep(0.02)
        for stage in STAGES:
            held = [len(w.conversation_ids()) for w in workers[stage]]
            assert sum(held) == 40 and all(16 <= n <= 24 for n in held), (stage, held)
            given = [sum(1 for r in routes if r.worker(stage) == w.worker_id) for w in workers[stage]]
            assert given == held, (stage, given, held)


async def test_a_draining_replica_gets_no_new_conversation_but_keeps_its_own(settings, redis_client):
    async with replicas(settings, gateways=1) as (workers, [hub]):
        before = await open_many([hub], 6)
        draining, other = workers["llm"]
        async with asyncio.timeout(5):  # every announcement taken
            while len(draining.conversation_ids()) + len(other.conversation_ids()) < 6:
                await asyncio.sleep(0.02)
        kept = set(draining.conversation_ids())
        assert kept, before
        draining.draining = True
        async with asyncio.timeout(5):
            while True:
                await hub.directory.refresh()
                if any(w.draining for w in hub.directory.workers["llm"]):
                    break
                await asyncio.sleep(0.05)
        assert hub.directory.live("llm") == {draining.worker_id, other.worker_id}
        after = await open_many([hub], 10)
        assert {r.llm for r in after} == {other.worker_id}
        assert set(draining.conversation_ids()) == kept
        assert all(hub.directory.pick("llm").worker_id == other.worker_id for _ in range(5))
        # operators see it: /admin/workers says which worker drains
        listed = (await admin_workers(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(gateway=hub)))))["workers"]
        assert {w["worker_id"]: w["draining"] for w in listed if w["stage"] == "llm"} == {
            draining.worker_id: True, other.worker_id: False,
        }


async def test_workers_follow_a_reroute_the_old_owner_lets_go_and_takes_it_back_when_moved_back(settings, redis_client):
    """The worker side of a re-route (gateway/reroute.py `REROUTE`): the new owner prepares, the
    other stages address it, the old owner drops the conversation and refuses its messages; moved
    back, the old owner takes it again."""
    from gateway.reroute import REROUTE
    from shared.messages import TextInput

    settings = settings.model_copy(update={"stale_timeout_s": 3.0})  # workers sweep every second
    async with replicas(settings, gateways=1) as (workers, [hub]):
        cid = str(uuid.uuid4())
        route, _token = await hub.open_conversation(cid, "corr-reroute")

        async def keep_lease() -> None:  # what the socket's session does while it lives
            while True:
                await asyncio.sleep(0.5)
                await hub.refresh_lease(cid)

        lease = asyncio.create_task(keep_lease())
        by_id = {w.worker_id: w for found in workers.values() for w in found}
        old = by_id[route.llm]
        new = next(w for w in workers["llm"] if w is not old)
        vad, tts = by_id[route.vad_stt], by_id[route.tts]
        async with asyncio.timeout(5):
            while not all(cid in w.conversation_ids() for w in (old, vad, tts)):
                await asyncio.sleep(0.02)
        reroute = redis_client.register_script(REROUTE)

        async def move_llm_to(worker) -> None:
            moved = route.moved("llm", worker.worker_id)
            args = [route.connection_id, "llm", worker.worker_id, *moved.inboxes(hub.names), hub.bus.encode(moved.opened())]
            assert await reroute(keys=[hub.names.conversation(cid)], args=args) == 1

        await move_llm_to(new)
        async with asyncio.timeout(10):  # the new owner prepares; the old one lets go at its sweeps
            while cid not in new.conversation_ids() or cid in old.conversation_ids():
                await asyncio.sleep(0.02)
        assert vad.conversations[cid].route.llm == new.worker_id and tts.conversations[cid].route.llm == new.worker_id
        assert new.conversations[cid].route.connection_id == route.connection_id
        # a message still reaching the old owner is refused: it does not serve the conversation again
        late = TextInput(conversation_id=cid, correlation_id="corr-reroute", turn_id="late-turn", text="hello")
        assert not await old.admit(late) and cid not in old.conversation_ids()

        await move_llm_to(old)  # and back: the old owner's fence on this socket is lifted
        async with asyncio.timeout(10):
            while cid not in old.conversation_ids() or cid in new.conversation_ids():
                await asyncio.sleep(0.02)
        assert vad.conversations[cid].route.llm == old.worker_id

        lease.cancel()
        await hub.end_conversation(cid, "corr-reroute", "client_disconnect", connection_id=route.connection_id)
        async with asyncio.timeout(5):
            while any(cid in w.conversation_ids() for found in workers.values() for w in found):
                await asyncio.sleep(0.02)
