"""A worker's shutdown ends even when a library swallows a cancellation (redis-py can turn one into
a ConnectionError, redis/redis-py#2028): the heartbeat loop stops on it, and a drain cancels its
loops until each has really ended, so the shutdown cleanup after them always runs."""
from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.bus import create_redis
from workers.tts.handler import TtsWorker


@pytest.fixture
async def worker(settings):
    client = create_redis(settings.redis_url_or_default)
    worker = TtsWorker(settings.model_copy(update={"null_mode": True}), client)
    yield worker
    await worker.aclose()
    await client.aclose()


async def test_the_heartbeat_loop_stops_when_redis_turns_its_cancellation_into_an_error(worker):
    beats: list[asyncio.Event] = []

    async def beat() -> None:  # a Redis call cancelled the way redis-py#2028 describes
        beats.append(asyncio.Event())
        beats[-1].set()
        if len(beats) == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RedisConnectionError("Connection closed by server.") from None

    worker.settings = worker.settings.model_copy(update={"heartbeat_interval_s": 0.05})
    worker._beat = beat
    task = asyncio.create_task(worker._heartbeat_loop())
    while not beats:
        await asyncio.sleep(0.01)
    task.cancel()  # once, as a TaskGroup does
    async with asyncio.timeout(10):
        while not task.done() and len(beats) == 1:  # ended, or went on to beat again
            await asyncio.sleep(0.01)
    assert task.done() and task.cancelled() and len(beats) == 1


async def test_a_drain_ends_the_worker_even_if_a_loop_swallows_a_cancellation(worker, caplog):
    swallowed: list[int] = []

    async def stubborn_loop() -> None:  # survives the first cancellation, stops at the second
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(1)
        await asyncio.Event().wait()

    worker._health_loop = stubborn_loop
    run = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        while not worker.serving:
            await asyncio.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="voicepipe.worker"):
        worker.request_drain()
        async with asyncio.timeout(10):
            await run  # returns normally once drained and cleaned up
    assert swallowed == [1]
    assert any("Shutdown cleanup completed" in r.getMessage() for r in caplog.records)
