"""One-shot requests to a stage worker (transcription, speech; shared/messages/requests.py), from
the gateway's side: pick a live worker, send, and read its answers until the last one.

The registry of requests waiting for answers is owned here; the HTTP routes (gateway/audio_api.py)
only hold an `OpenRequest` while they serve it. A request never waits in silence: the worker that
serves it is watched through the directory (its heartbeat gone: `stage_failed`), and a worker that
says nothing for `REQUEST_TIMEOUT_S` fails the request too. Leaving the `async with` (the answer
is complete, or the HTTP client went away, or anything failed) withdraws the request, and tells
the worker to drop it if it may still be working on it."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from gateway.directory import WorkerDirectory
from shared.bus import Bus
from shared.channels import Names
from shared.messages import RequestCancel
from shared.messages.requests import REQUEST_PREFIX, RequestReply

log = logging.getLogger("voicepipe.gateway.requests")

LIVENESS_CHECK_S = 0.5  # how often a waiting request checks that its worker is still alive


class RequestFailed(Exception):
    """The request cannot be answered: `code` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class OpenRequest:
    request_id: str
    stage: str
    worker_id: str
    answers: asyncio.Queue[RequestReply] = field(default_factory=asyncio.Queue)
    finished: bool = False  # the worker sent its last answer: nothing to cancel

    async def next(self, directory: WorkerDirectory, timeout_s: float) -> RequestReply:
        """The worker's next answer; RequestFailed if the worker died or stayed silent too long."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await asyncio.wait_for(self.answers.get(), LIVENESS_CHECK_S)
            except TimeoutError:
                pass
            if not any(w.worker_id == self.worker_id for w in directory.workers[self.stage]):
                raise RequestFailed("stage_failed", f"the {self.stage} worker serving the request stopped")
            if loop.time() >= deadline:
                raise RequestFailed("stage_failed", f"the {self.stage} worker did not answer in time")


class PendingRequests:
    def __init__(self, bus: Bus, names: Names, directory: WorkerDirectory, gateway_id: str) -> None:
        self._bus = bus
        self._names = names
        self._directory = directory
        self._gateway_id = gateway_id
        self._open: dict[str, OpenRequest] = {}
        self.dropped = 0  # answers that came for no open request (late, or after the client left)

    def __len__(self) -> int:
        return len(self._open)

    def new_id(self) -> str:
        return f"{REQUEST_PREFIX}{uuid.uuid4().hex}"

    @contextlib.asynccontextmanager
    async def open(self, stage: str, request_id: str) -> AsyncIterator[OpenRequest]:
        """Reserve a live worker of `stage` for the request and collect its answers meanwhile."""
        if not self._directory.workers[stage]:
            await self._directory.refresh()
        worker = self._directory.pick(stage)
        if worker is None:
            raise RequestFailed("stage_unavailable", f"no live {stage} worker")
        request = OpenRequest(request_id, stage, worker.worker_id)
        self._open[request_id] = request
        try:
            yield request
        finally:
            self._open.pop(request_id, None)
            if not request.finished:
                await self._cancel(request)

    async def send(self, request: OpenRequest, message) -> None:
        try:
            await self._bus.publish(self._names.inbox(request.stage, request.worker_id), message)
        except (RedisError, OSError) as exc:
            raise RequestFailed("bus_unavailable", "the message bus is unavailable") from exc

    async def _cancel(self, request: OpenRequest) -> None:
        cancel = RequestCancel(conversation_id=request.request_id)
        try:
            await asyncio.shield(self._bus.publish(self._names.inbox(request.stage, request.worker_id), cancel))
        except (RedisError, OSError, asyncio.CancelledError) as exc:  # the worker's limit and its own end bound it
            log.debug("could not withdraw request %s: %r", request.request_id, exc)

    def deliver(self, message: RequestReply) -> None:
        request = self._open.get(message.conversation_id)
        if request is None:
            self.dropped += 1
            return
        request.answers.put_nowait(message)
