"""`keep_running`: a long-lived loop that ends is logged loudly and started again; cancellation stops it."""
from __future__ import annotations

import asyncio
import logging

import pytest

from shared import tasks
from shared.tasks import keep_running


async def test_a_loop_that_fails_or_returns_is_restarted_and_counted(monkeypatch, caplog):
    monkeypatch.setattr(tasks, "RESTART_BACKOFF_S", (0.001, 0.002))
    runs: list[int] = []
    serving = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("a bug")
        if len(runs) == 2:
            return  # a loop meant to run for ever that ends is a bug too
        serving.set()
        await asyncio.Event().wait()

    restarts: dict[str, int] = {}
    with caplog.at_level(logging.ERROR, logger="voicepipe.tasks"):
        task = asyncio.create_task(keep_running("reader", loop, restarts))
        await asyncio.wait_for(serving.wait(), 5)
    assert runs == [0, 1, 2] and restarts == {"reader": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("loop reader failed") and caplog.records[0].exc_info is not None
    assert messages[1].startswith("loop reader ended unexpectedly")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_is_never_swallowed():
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(keep_running("x", loop))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_that_swallows_its_cancellation_still_stops():
    """redis-py can swallow a cancellation (redis/redis-py#2028): the loop then returns normally,
    and restarting it would keep a TaskGroup's shutdown waiting for ever."""
    started = asyncio.Event()
    runs = 0

    async def swallowing() -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return  # what a library that swallows the cancellation looks like from outside

    task = asyncio.create_task(keep_running("reader", swallowing, {}))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.done() and task.cancelled() and runs == 1


async def test_log_running_tasks_says_what_each_task_waits_on(caplog):
    async def waiting_for_the_bus() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(waiting_for_the_bus(), name="stuck-reader")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="voicepipe.test"):
        tasks.log_running_tasks(logging.getLogger("voicepipe.test"), "shutdown is taking long")
    task.cancel()
    (record,) = caplog.records
    assert record.getMessage().startswith("shutdown is taking long; ")
    assert "stuck-reader" in record.getMessage() and "waiting_for_the_bus" in record.getMessage()
