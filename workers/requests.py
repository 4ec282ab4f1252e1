"""One-shot requests a worker serves beside its conversations (shared/messages/requests.py).

A transcription or a speech request has no socket and no lease, so the lifecycle machinery of
conversations (routing, `connection_disconnected`, the sweep) does not apply; what bounds it is
here instead: one task per request, owned by this registry, at most `limit` at once (a further
request is answered `rate_limited` at once, never queued without bound), cancelled by the asking
gateway's `RequestCancel` when its HTTP client goes away, and all cancelled at shutdown. The model
work itself goes through the worker's fair scheduler under the request's id, so a request takes
its turn with the conversations and never starves them."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from shared.tasks import stop_tasks

log = logging.getLogger("voicepipe.requests")


class OneShotRequests:
    def __init__(self, owner: str, limit: int) -> None:
        self.owner = owner
        self.limit = limit
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.served = 0
        self.refused = 0
        self.cancelled = 0

    def start(self, request_id: str, work: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Run `work()` for the request; False (nothing started) when `limit` requests run already
        or this id runs already (a duplicate delivery)."""
        if request_id in self._tasks:
            return True
        if len(self._tasks) >= self.limit:
            self.refused += 1
            return False
        task = asyncio.get_running_loop().create_task(work(), name=f"{self.owner}:{request_id}")
        self._tasks[request_id] = task
        task.add_done_callback(lambda t: self._done(request_id, t))
        return True

    def _done(self, request_id: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
        if task.cancelled():
            self.cancelled += 1
            return
        self.served += 1
        if task.exception() is not None:
            log.error("request %s failed", request_id, exc_info=task.exception())

    def cancel(self, request_id: str) -> bool:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return False
        task.cancel()
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await stop_tasks(tasks)
