"""Stand-in heartbeats for the three stages, for tests of the gateway alone.

The gateway opens a conversation once every stage has a live worker; what lives before and at the
WebSocket upgrade (tokens, origins, connection limits, resume tokens) needs nothing more of the
workers, so these tests publish heartbeats exactly as a worker does (shared/channels.py names, the
same JSON) instead of loading speech models into three more processes."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from shared.channels import Names
from shared.clock import now_ms
from shared.stages import STAGES


@contextlib.asynccontextmanager
async def standin_workers(redis_url: str, namespace: str, ttl_ms: int = 5000) -> AsyncIterator[None]:
    names = Names(namespace, "", "")
    client = aioredis.Redis.from_url(redis_url)

    async def beat() -> None:
        now = now_ms()
        async with client.pipeline(transaction=False) as pipe:
            for stage in STAGES:
                worker_id = f"{stage}-standin"
                payload = {"worker_id": worker_id, "stage": stage, "last_heartbeat_ms": now, "conversations": 0}
                pipe.set(names.worker(stage, worker_id), json.dumps(payload), px=ttl_ms)
                pipe.zadd(names.workers(stage), {worker_id: now})
            await pipe.execute()

    async def keep_beating() -> None:
        while True:
            await asyncio.sleep(0.3)
            await beat()

    await beat()
    task = asyncio.create_task(keep_beating(), name="standin-heartbeats")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
