"""The gateway process: its inbox on the bus, the live client sessions, and conversation open/close.

`end_conversation` is the single place a conversation ends at the gateway: it removes the routing
and publishes `connection_disconnected` (retried with backoff), whatever way the socket ended."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.directory import WorkerDirectory
from shared.bus import Bus, run_subscriber
from shared.channels import STAGES, Names
from shared.clock import now_ms
from shared.config import Settings
from shared.logging import log_context
from shared.messages import BusMessage, ConnectionDisconnected
from shared.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.session import ClientSession

log = logging.getLogger("voicepipe.gateway")


class NotReady(Exception):
    """A stage has no live worker, so a conversation cannot be served."""


@dataclass
class Stats:
    current: int = 0
    peak: int = 0
    total: int = 0
    rejected: int = 0
    published: int = 0
    publish_failures: int = 0


class Gateway:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.names = Names.from_settings(settings)
        self.gateway_id = f"gateway-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.bus = Bus(client, self.gateway_id)
        self.inbox = self.names.inbox("gateway", self.gateway_id)
        self.directory = WorkerDirectory(client, self.names, settings.worker_ttl_s)
        self.sessions: dict[str, ClientSession] = {}
        self.stats = Stats()
        self.started = time.monotonic()
        self._tasks = TaskSet("gateway")
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._tasks.spawn(
            run_subscriber(self.redis, [self.inbox], self._deliver, on_subscribed=self._on_subscribed, name="gateway"),
            name="inbox",
        )
        self._tasks.spawn(self._refresh_directory(), name="directory")
        try:
            async with asyncio.timeout(5):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("gateway inbox not subscribed yet; Redis may be unreachable")

    async def _on_subscribed(self) -> None:
        self._subscribed.set()

    async def aclose(self) -> None:
        await self.close_sessions(1001, "server shutting down")
        await self._tasks.aclose()

    async def close_sessions(self, code: int, reason: str) -> None:
        """Close every client socket; each session's own cleanup publishes its disconnect event."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.shutting_down = True
            await session.close(code, reason)
        if sessions:
            deadline = time.monotonic() + 5
            while self.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    async def _refresh_directory(self) -> None:
        while True:
            try:
                await self.directory.refresh()
            except (RedisError, OSError) as exc:
                log.warning("worker directory refresh failed: %s", exc)
            await asyncio.sleep(0.5)

    async def _deliver(self, channel: str, message: BusMessage) -> None:
        session = self.sessions.get(message.conversation_id)
        if session is None:
            with log_context(message.conversation_id, message.correlation_id):
                log.debug("dropped %s for a conversation not on this gateway", message.type)
            return
        session.deliver(message)

    # ---- conversation lifecycle
    async def open_conversation(self, conversation_id: str, correlation_id: str) -> dict[str, str]:
        if self.directory.missing():
            await self.directory.refresh()
        if missing := self.directory.missing():
            raise NotReady(f"no live worker for: {', '.join(missing)}")
        route = {stage: self.directory.pick(stage).worker_id for stage in STAGES}
        route.update(gateway=self.gateway_id, correlation_id=correlation_id, created_ms=str(now_ms()))
        resume_token = secrets.token_urlsafe(24)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.names.conversation(conversation_id), mapping=route)
            pipe.expire(self.names.conversation(conversation_id), max(1, int(self.settings.stale_timeout_s)))
            pipe.set(self.names.resume(conversation_id), resume_token, ex=self.settings.resume_window_s)
            await pipe.execute()
        route["resume_token"] = resume_token
        self.stats.current += 1
        self.stats.total += 1
        self.stats.peak = max(self.stats.peak, self.stats.current)
        return route

    async def end_conversation(
        self, conversation_id: str, correlation_id: str, reason: str, detail: str | None = None, *, opened: bool
    ) -> None:
        if opened:
            self.stats.current -= 1
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.names.conversation(conversation_id))
                pipe.expire(self.names.resume(conversation_id), self.settings.resume_window_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not remove conversation routing (it expires by itself): %s", exc)
        event = ConnectionDisconnected(
            conversation_id=conversation_id,
            correlation_id=correlation_id,
            reason=reason,
            gateway_id=self.gateway_id,
            detail=detail,
        )
        await self.publish_disconnect(event)

    async def publish_disconnect(self, event: ConnectionDisconnected, attempts: int = 5) -> bool:
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                receivers = await self.bus.publish(self.names.connection_events, event)
            except (RedisError, OSError) as exc:
                log.warning("publishing connection_disconnected failed (attempt %d): %s", attempt, exc)
                if attempt < attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            self.stats.published += 1
            if receivers == 0:
                log.warning("connection_disconnected reached no subscriber; the stale sweep will clean up")
            log.info("published connection_disconnected (%s) to %d subscribers", event.reason, receivers)
            return True
        self.stats.publish_failures += 1
        log.error("connection_disconnected could not be published; the stale sweep will clean up")
        return False

    async def refresh_lease(self, conversation_id: str) -> None:
        await self.redis.expire(self.names.conversation(conversation_id), max(1, int(self.settings.stale_timeout_s)))
