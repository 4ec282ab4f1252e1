"""The gateway process: its inbox on the bus, the live client sessions, and conversation open/close.

`end_conversation` is the single place a conversation ends at the gateway: it removes the routing
lease and publishes `connection_disconnected` (retried with backoff), whatever way the socket ended.
A sweep publishes the event for conversations whose gateway died (lease expired, no event)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.directory import WorkerDirectory
from shared.bus import Bus, SubscriberStats, run_subscriber
from shared.channels import STAGES, Names
from shared.clock import now_ms
from shared.config import Settings
from shared.logging import log_context, redact_url
from shared.memory import trim_loop
from shared.messages import (
    BusMessage,
    ConnectionDisconnected,
    ConversationOpened,
    IntrospectReply,
    IntrospectRequest,
    SessionTakeover,
)
from shared.tasks import TaskSet, keep_running

if TYPE_CHECKING:
    from gateway.session import ClientSession

log = logging.getLogger("voicepipe.gateway")

RESUME_TOKEN_FIELD = "resume_token"


class NotReady(Exception):
    """A stage has no live worker, so a conversation cannot be served."""


class ResumeRefused(Exception):
    """Unknown conversation, wrong token, or the resume window has passed."""


@dataclass
class Stats:
    current: int = 0
    peak: int = 0
    total: int = 0
    rejected: int = 0
    published: int = 0
    publish_failures: int = 0
    stale_sweeps: int = 0
    stale_cleaned: int = 0
    last_stale_sweep_ms: int | None = None
    last_shutdown_cleanup: dict[str, object] | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    interrupted: dict[str, int] = field(default_factory=dict)  # replies interrupted, by reason


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
        self.bus_stats = SubscriberStats()  # inbox messages dropped at the bus boundary
        self.loop_restarts: dict[str, int] = {}  # long-lived loops that ended and were started again
        self._subscribed = asyncio.Event()
        self._introspections: dict[str, list[IntrospectReply]] = {}
        self._lease_s = max(1, int(settings.stale_timeout_s))

    async def start(self) -> None:
        log.info("gateway %s on %s", self.gateway_id, redact_url(self.settings.redis_url_or_default))
        # restarted if they ever end (logged as errors): a gateway whose inbox reader died would
        # still answer /readyz 200 while no reply reaches any client
        for name, loop in (("inbox", self._read_inbox), ("directory", self._refresh_directory), ("stale-sweep", self._stale_sweep_loop)):
            self._tasks.spawn(keep_running(name, loop, self.loop_restarts), name=name)
        trim = trim_loop(self.settings.memory_trim_interval_s, lambda: self.stats.published, lambda: not self.sessions)
        self._tasks.spawn(trim, name="memory-trim")
        try:
            async with asyncio.timeout(5):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("gateway inbox not subscribed yet; Redis may be unreachable")

    async def _read_inbox(self) -> None:
        await run_subscriber(
            self.redis, [self.inbox], self._deliver, on_subscribed=self._on_subscribed, name="gateway", stats=self.bus_stats
        )

    async def _on_subscribed(self) -> None:
        self._subscribed.set()

    async def aclose(self) -> None:
        await self.close_sessions(1001, "server shutting down")
        await self._tasks.aclose()

    async def close_sessions(self, code: int, reason: str) -> None:
        """Close every client socket; each session's own cleanup publishes its disconnect event."""
        sessions = list(self.sessions.values())
        if not sessions:
            return
        started, published = time.perf_counter(), self.stats.published
        for session in sessions:
            session.shutting_down = True
            await session.close(code, reason)
        deadline = time.monotonic() + 5
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.stats.last_shutdown_cleanup = {
            "at_ms": now_ms(),
            "sessions": len(sessions),
            "events_published": self.stats.published - published,
            "left_open": len(self.sessions),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        log.info("shutdown cleanup: %s", self.stats.last_shutdown_cleanup)

    async def _refresh_directory(self) -> None:
        while True:
            try:
                await self.directory.refresh()
            except (RedisError, OSError) as exc:
                log.warning("worker directory refresh failed: %s", exc)
            await asyncio.sleep(0.5)

    async def _deliver(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, IntrospectReply):
            replies = self._introspections.get(message.request_id)
            if replies is not None:
                replies.append(message)
            return
        session = self.sessions.get(message.conversation_id)
        if session is None:
            with log_context(message.conversation_id, message.correlation_id):
                log.debug("dropped %s for a conversation not on this gateway", message.type)
            return
        session.deliver(message)

    # ---- conversation lifecycle
    async def open_conversation(
        self, conversation_id: str, correlation_id: str, resume_token: str | None = None
    ) -> dict[str, str]:
        """Assign a worker of each stage and write the routing lease; returns the route."""
        if self.directory.missing():
            await self.directory.refresh()
        if missing := self.directory.missing():
            raise NotReady(f"no live worker for: {', '.join(missing)}")
        route = {stage: self.directory.pick(stage).worker_id for stage in STAGES}
        route.update(
            gateway=self.gateway_id,
            correlation_id=correlation_id,
            connection_id=uuid.uuid4().hex,
            created_ms=str(now_ms()),
        )
        token = resume_token or secrets.token_urlsafe(24)
        conv_key, history_key = self.names.conversation(conversation_id), self.names.history(conversation_id)
        opened = self.bus.encode(
            ConversationOpened(
                conversation_id=conversation_id,
                correlation_id=correlation_id,
                **{name: route[name] for name in (*STAGES, "gateway", "connection_id")},
            )
        )
        async with self.redis.pipeline(transaction=True) as pipe:  # the lease, then the announcement
            pipe.hset(conv_key, mapping=route)
            pipe.expire(conv_key, self._lease_s)
            pipe.hset(history_key, RESUME_TOKEN_FIELD, token)
            pipe.expire(history_key, self.settings.resume_window_s + self._lease_s)
            pipe.zadd(self.names.live, {conversation_id: now_ms() + self._lease_s * 1000})
            for stage in STAGES:
                pipe.publish(self.names.inbox(stage, route[stage]), opened)
            await pipe.execute()
        route["resume_token"] = token
        self.stats.current += 1
        self.stats.total += 1
        self.stats.peak = max(self.stats.peak, self.stats.current)
        return route

    async def check_resume(self, conversation_id: str, token: str) -> None:
        """Raise ResumeRefused unless the pair names a conversation within its resume window.

        If the conversation's old socket is still registered (a client that moved networks before
        its old socket timed out), that socket is closed first and its cleanup awaited."""
        stored = await self.redis.hget(self.names.history(conversation_id), RESUME_TOKEN_FIELD)
        if stored is None or not hmac.compare_digest(stored.decode(), token):
            raise ResumeRefused("unknown or expired conversation_id and resume_token")
        route = await self.redis.hgetall(self.names.conversation(conversation_id))
        if not route:
            return
        takeover = SessionTakeover(
            conversation_id=conversation_id,
            correlation_id=route[b"correlation_id"].decode(),
            connection_id=route[b"connection_id"].decode(),
        )
        await self.bus.publish(self.names.inbox("gateway", route[b"gateway"].decode()), takeover)
        async with asyncio.timeout(5):
            while await self.redis.exists(self.names.conversation(conversation_id)):
                await asyncio.sleep(0.02)

    async def end_conversation(
        self,
        conversation_id: str,
        correlation_id: str,
        reason: str,
        detail: str | None = None,
        *,
        connection_id: str | None = None,
    ) -> None:
        if connection_id is not None:
            self.stats.current -= 1
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
        event = ConnectionDisconnected(
            conversation_id=conversation_id,
            correlation_id=correlation_id,
            reason=reason,
            gateway_id=self.gateway_id,
            connection_id=connection_id,
            detail=detail,
        )
        try:  # one round trip: the lease goes and the event goes out together, in that order
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.names.conversation(conversation_id))
                pipe.zrem(self.names.live, conversation_id)
                pipe.expire(self.names.history(conversation_id), self.settings.resume_window_s)
                pipe.publish(self.names.connection_events, self.bus.encode(event))
                *_, receivers = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not end the conversation in Redis (its lease expires by itself): %s", exc)
            await self.publish_disconnect(event)
            return
        self._published(event, receivers)

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
            self._published(event, receivers)
            return True
        self.stats.publish_failures += 1
        log.error("connection_disconnected could not be published; the workers' sweep will clean up")
        return False

    def _published(self, event: ConnectionDisconnected, receivers: int) -> None:
        self.stats.published += 1
        if receivers == 0:
            log.warning("connection_disconnected reached no subscriber; the workers' sweep will clean up")
        log.info("published connection_disconnected (%s) to %d subscribers", event.reason, receivers)

    async def refresh_lease(self, conversation_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(self.names.conversation(conversation_id), self._lease_s)
            pipe.expire(self.names.history(conversation_id), self.settings.resume_window_s + self._lease_s)
            pipe.zadd(self.names.live, {conversation_id: now_ms() + self._lease_s * 1000})
            await pipe.execute()

    # ---- stale sweep: conversations whose gateway died without publishing their event
    async def _stale_sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.settings.stale_timeout_s / 3))
            try:
                await self.sweep_stale()
            except (RedisError, OSError) as exc:
                log.warning("stale sweep failed: %s", exc)

    async def sweep_stale(self) -> int:
        """Publish `connection_disconnected` (reason timeout) for every expired lease; any gateway
        may do it, and ZREM decides which one does, so each event is published once."""
        self.stats.stale_sweeps += 1
        self.stats.last_stale_sweep_ms = now_ms()
        expired = await self.redis.zrangebyscore(
            self.names.live, "-inf", now_ms(), start=0, num=max(1, self.settings.cleanup_batch_size)
        )
        cleaned = 0
        for raw in expired:
            cid = raw.decode(errors="replace")  # ZREM below uses the member as stored
            if cid in self.sessions or await self.redis.exists(self.names.conversation(cid)):
                continue  # alive: its lease refresh is merely late
            if await self.redis.zrem(self.names.live, raw):
                with log_context(cid):
                    log.warning("stale conversation: its gateway stopped refreshing the lease")
                    await self.publish_disconnect(
                        ConnectionDisconnected(
                            conversation_id=cid, reason="timeout", gateway_id=self.gateway_id, detail="stale"
                        )
                    )
                cleaned += 1
        self.stats.stale_cleaned += cleaned
        return cleaned

    # ---- introspection: ask every worker, live
    async def introspect(self, conversation_id: str = "") -> tuple[list[IntrospectReply], list[str]]:
        """Every live worker's answer, and the ids of live workers that did not answer in time."""
        await self.directory.refresh()
        expected = {w.worker_id for stage in STAGES for w in self.directory.workers[stage]}
        request_id = uuid.uuid4().hex
        replies: list[IntrospectReply] = []
        self._introspections[request_id] = replies
        try:
            request = IntrospectRequest(conversation_id=conversation_id, request_id=request_id, reply_to=self.inbox)
            await self.bus.publish(self.names.control, request)
            deadline = time.monotonic() + self.settings.introspect_timeout_s
            while time.monotonic() < deadline and not expected <= {r.worker_id for r in replies}:
                await asyncio.sleep(0.005)
        finally:
            self._introspections.pop(request_id, None)
        return replies, sorted(expected - {r.worker_id for r in replies})
