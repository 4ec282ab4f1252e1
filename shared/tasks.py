"""Task ownership: every task is tracked, logged if it fails, and really stopped on close.

`stop_tasks` cancels and waits, and cancels again while a task is still running: a library may
swallow one cancellation that lands inside it (redis-py's asyncio client can, see
redis/redis-py#2028), so a single `cancel()` is not a guarantee that the task ends.

`keep_running` is for a process's long-lived loops (bus reader, heartbeat, sweeps, directory):
they catch what they expect per iteration, and anything else that ends one is a bug that must not
silently take a duty away from a process that still reports itself healthy. So the loop is logged
loudly (ERROR with the traceback) and started again after a short backoff, for as long as the
process lives; only cancellation stops it."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

log = logging.getLogger("voicepipe.tasks")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel the tasks and wait until every one has ended (or `timeout` passes)."""
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + timeout
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.01, max(0.0, deadline - time.monotonic())))
        if pending and time.monotonic() >= deadline:
            for task in pending:
                log.warning("task %s did not stop within %.1f s", task.get_name(), timeout)
            return


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop. For a loop that survives the
    errors of a library which can turn our cancellation into one of its own (redis-py#2028): call
    it in the handler of those errors, or the loop runs for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancelled inside a library call")


def log_running_tasks(logger: logging.Logger, why: str) -> None:
    """Log every unfinished task of the running loop with where it waits: what a stuck shutdown
    is waiting for."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    report = io.StringIO()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        task.print_stack(limit=12, file=report)
    logger.warning("%s; %d tasks still running:\n%s", why, len(tasks), report.getvalue())


RESTART_BACKOFF_S = (0.1, 5.0)  # first and longest wait before a loop that ended is started again


async def keep_running(name: str, loop: Callable[[], Coroutine[Any, Any, Any]], restarts: dict[str, int] | None = None) -> None:
    """Run `loop()` for ever: when it returns or raises (anything but cancellation), log it as an
    error and start it again after a backoff (doubling up to 5 s; back to the start once a run has
    lasted a minute). `restarts`, if given, counts the restarts by `name`."""
    backoff = RESTART_BACKOFF_S[0]
    while True:
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # a library swallowed our cancellation: still stop
            raise asyncio.CancelledError(f"{name} cancelled")
        if time.monotonic() - started > 60:
            backoff = RESTART_BACKOFF_S[0]
        how = "failed" if failure is not None else "ended unexpectedly"
        log.error("loop %s %s; restarting it in %.1f s", name, how, backoff, exc_info=failure)
        if restarts is not None:
            restarts[name] = restarts.get(name, 0) + 1
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RESTART_BACKOFF_S[1])


class TaskSet:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop every task; safe to call twice."""
        await stop_tasks(list(self._tasks), timeout)


class Fence:
    """Set once something has ended; code that publishes for it checks `guard()` after each await,
    so nothing leaves for an ended conversation, turn or reply even if a cancellation was lost."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def guard(self) -> None:
        if self.closed:
            raise asyncio.CancelledError("fenced")
