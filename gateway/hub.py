"""The gateway process: its inbox on the bus, the live conversations, and conversation open/close.

The gateway owns the registry of its conversations (gateway/conversation.py): `serve_conversation`
opens one, registers it, runs the wire protocol's side of it, and always ends it, whatever the
protocol (gateway/voicepipe_ws.py, gateway/realtime.py); the inbox reader hands each bus message to
its conversation. `end_conversation` is the single place a conversation ends at the gateway: it
removes the routing lease and publishes `connection_disconnected` (retried with backoff), whatever
way the socket ended.
A sweep publishes the event for conversations whose gateway died (lease expired, no event).

Resume tokens (docs/protocol.md §1 "Resuming"): Redis keeps only a SHA-256 of the token, and a
resume swaps it for a new one in one Lua step (`CLAIM_RESUME`), so the token rotates on every
resume and, of two resumes racing with the same token, exactly one wins; the other is refused
(4404) before anything of the conversation is touched. Comparing digests inside Redis is not a
timing oracle: how many leading bytes of SHA-256(guess) match says nothing about the token.
A socket only ever deletes the routing lease if the lease still names that socket
(`END_CONVERSATION`), so a socket that was taken over, ending late, never tears down the lease of
the one that replaced it (the workers likewise ignore its disconnect event, by `connection_id`)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from gateway.auth import as_bytes, parse_networks
from gateway.conversation import Conversation, Wire
from gateway.directory import WorkerDirectory
from gateway.latency import GatewayLatency
from gateway.limits import ConnectionLimits
from gateway.metrics import GatewayMetrics
from gateway.recovery import Recovery
from gateway.requests import PendingRequests
from gateway.reroute import Rerouter
from gateway.uplink import Uplink
from shared.bus import Bus, SubscriberStats, run_subscriber
from shared.bus_health import BusHealth
from shared.channels import Names
from shared.clock import now_ms
from shared.config import Settings
from shared.logging import log_context, redact_url
from shared.memory import trim_loop
from shared.messages import (
    BusMessage,
    ConnectionDisconnected,
    IntrospectReply,
    IntrospectRequest,
    SessionTakeover,
    SpeechAudio,
    SpeechDone,
    TranscriptionResult,
)
from shared.route import Route
from shared.stages import GATEWAY, STAGES
from shared.tasks import TaskSet, keep_running

log = logging.getLogger("voicepipe.gateway")

RESUME_TOKEN_FIELD = "resume_token_sha256"  # in the history hash; the token itself is never stored
CONVERSATION_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # what a resume may name (ours are UUID4s)
TAKEOVER_WAIT_S = 5.0  # how long a resume waits for the old socket's cleanup before replacing it anyway

# KEYS[1] the history hash; ARGV[1] the token field, ARGV[2] SHA-256 of the presented token,
# ARGV[3] SHA-256 of its successor. 1: claimed (the successor is stored), 0: refused
CLAIM_RESUME = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored or stored ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS[1] the lease, KEYS[2] live conversations, KEYS[3] the history hash
# ARGV[1] this socket's connection id, ARGV[2] conversation id, ARGV[3] resume window (s),
# ARGV[4] the connection_events channel, ARGV[5] the event. The lease goes (if it is this socket's,
# or gone already) and then the event goes out, in one step; returns the event's receivers.
END_CONVERSATION = """
local holder = redis.call('HGET', KEYS[1], 'connection_id')
if holder == false or holder == nil or holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
end
return redis.call('PUBLISH', ARGV[4], ARGV[5])
"""


def token_digest(token: str) -> str:
    return hashlib.sha256(as_bytes(token)).hexdigest()


class NotReady(Exception):
    """A stage has no live worker, so a conversation cannot be served."""


class ResumeRefused(Exception):
    """Unknown conversation, wrong token, or the resume window has passed."""


@dataclass
class Stats:
    current: int = 0
    peak: int = 0
    total: int = 0
    rejected: int = 0  # refused before the upgrade, for any reason in `rejected_by`
    rejected_by: dict[str, int] = field(default_factory=dict)  # token, origin, limit, bus_unavailable
    closed_slow: int = 0  # clients closed for not reading (MAX_OUTBOUND_BYTES queued)
    closed_rate_limited: int = 0  # clients closed for sending too fast for RATE_LIMIT_CLOSE_S
    rate_limited_frames: dict[str, int] = field(default_factory=dict)  # dropped client frames: text, audio
    published: int = 0
    publish_failures: int = 0
    published_by_reason: Counter[str] = field(default_factory=Counter)  # for /metrics
    failures_by_reason: Counter[str] = field(default_factory=Counter)
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
        self.inbox = self.names.inbox(GATEWAY, self.gateway_id)
        self.directory = WorkerDirectory(client, self.names, settings.worker_ttl_s)
        self.requests = PendingRequests(self.bus, self.names, self.directory, self.gateway_id)  # OpenAI audio API
        self.rerouter = Rerouter(self)  # moves this gateway's conversations off dead workers
        self.conversations: dict[str, Conversation] = {}
        self.stats = Stats()
        self.started = time.monotonic()
        self._tasks = TaskSet("gateway")
        self.bus_stats = SubscriberStats()  # inbox messages dropped at the bus boundary
        self.loop_restarts: dict[str, int] = {}  # long-lived loops that ended and were started again
        self._subscribed = asyncio.Event()
        self.inbox_live = False  # the inbox subscription is up (and caught up after an outage)
        self._introspections: dict[str, list[IntrospectReply]] = {}
        self._lease_s = max(1, int(settings.stale_timeout_s))
        self.closing = False  # shutting down: no new conversation is opened
        self.metrics = GatewayMetrics(self)
        self.latency = GatewayLatency()  # what the gateway itself adds to a message (capacity benchmark)
        self.uplink = Uplink(client, self.latency.audio_in.observe)  # client audio and commits, pipelined
        self.limits = ConnectionLimits(settings, client, self.names, self.gateway_id)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self.client_tokens = [as_bytes(token) for token in settings.client_tokens]
        self._claim_resume = client.register_script(CLAIM_RESUME)
        self._end_conversation = client.register_script(END_CONVERSATION)
        self.bus_health = BusHealth(settings.redis_url_or_default)  # refuses new sockets while Redis is down
        self.recovery = Recovery(self)  # turns in flight and routing across a Redis outage

    def reject(self, why: str) -> None:
        self.stats.rejected += 1
        self.stats.rejected_by[why] = self.stats.rejected_by.get(why, 0) + 1

    async def start(self) -> None:
        log.info("gateway %s on %s", self.gateway_id, redact_url(self.settings.redis_url_or_default))
        # restarted if they ever end (logged as errors): a gateway whose inbox reader died would
        # still answer /readyz 200 while no reply reaches any client
        loops = (
            ("inbox", self._read_inbox),
            ("directory", self._refresh_directory),
            ("stale-sweep", self._stale_sweep_loop),
            ("uplink", self.uplink.run),
            ("bus-health", self.bus_health.run),
        )
        for name, loop in loops:
            self._tasks.spawn(keep_running(name, loop, self.loop_restarts), name=name)
        trim = trim_loop(self.settings.memory_trim_interval_s, lambda: self.stats.published, lambda: not self.conversations)
        self._tasks.spawn(trim, name="memory-trim")
        if self.limits.enabled:
            try:
                await self.limits.start()
            except (RedisError, OSError) as exc:
                log.warning("connection-limit heartbeat failed at start (retried): %s", exc)
            self._tasks.spawn(self.limits.run(), name="connection-limits")
        try:
            async with asyncio.timeout(5):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("gateway inbox not subscribed yet; Redis may be unreachable")

    async def _read_inbox(self) -> None:
        await run_subscriber(
            self.redis,
            [self.inbox],
            self._deliver,
            on_subscribed=self._on_subscribed,
            on_lost=self._on_bus_lost,
            name="gateway",
            stats=self.bus_stats,
        )

    async def _on_subscribed(self) -> None:
        if self._subscribed.is_set():  # subscribed again after losing Redis: routing may be gone with it
            await self.recovery.bus_back()
        self._subscribed.set()
        self.inbox_live = True

    async def _on_bus_lost(self) -> None:
        self.inbox_live = False
        self.recovery.bus_lost("the gateway's inbox subscription dropped")

    async def aclose(self) -> None:
        await self.close_conversations(1001, "server shutting down")
        await self._tasks.aclose()
        await self.limits.aclose()  # after every conversation released its slot

    async def close_conversations(self, code: int, reason: str) -> dict[str, object]:
        """The shutdown cleanup, once: stop taking conversations; close every socket (each
        conversation's own end publishes its disconnect event, no batch cap), round after round until
        none is left or `SHUTDOWN_MAX_ITERATIONS`; publish the event here for any socket that did
        not end; wait (bounded) until the workers confirm they hold none of these conversations;
        log one summary line and keep its figures in `last_shutdown_cleanup`."""
        if self.stats.last_shutdown_cleanup is not None:
            return self.stats.last_shutdown_cleanup
        self.closing = True
        started = time.perf_counter()
        before = len(self.conversations)
        closed: dict[str, Conversation] = {}
        iterations = 0
        while self.conversations and iterations < max(1, self.settings.shutdown_max_iterations):
            iterations += 1
            round_ = dict(self.conversations)
            closed.update(round_)
            for conversation in round_.values():
                conversation.shutting_down = True
                await conversation.close(code, reason)
            deadline = time.monotonic() + 2
            while any(self.conversations.get(cid) is c for cid, c in round_.items()) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        after = len(self.conversations)
        for cid, conversation in list(self.conversations.items()):  # stuck sockets: their workers still hear of the end
            with log_context(cid, conversation.correlation_id):
                await self.end_conversation(cid, conversation.correlation_id, "server_error", "shutdown")
        confirmed = await self._workers_released(set(closed))
        duration_ms = (time.perf_counter() - started) * 1000
        summary: dict[str, object] = {
            "cleaned": before - after,
            "iterations": iterations,
            "before": before,
            "after": after,
            "duration_ms": round(duration_ms, 1),
            "max_iterations_reached": after > 0,
            "workers_confirmed": confirmed,
            "at_ms": now_ms(),
        }
        self.stats.last_shutdown_cleanup = summary
        log.info(
            "Shutdown cleanup completed: cleaned=%d connections, iterations=%d, before=%d, after=%d, "
            "duration=%.1fms, max_iterations_reached=%s",
            before - after, iterations, before, after, duration_ms, after > 0,
        )
        return summary

    async def _workers_released(self, conversation_ids: set[str]) -> bool:
        """Wait up to `SHUTDOWN_CONFIRM_TIMEOUT_S` until no live worker holds any of these."""
        if not conversation_ids:
            return True
        deadline = time.monotonic() + self.settings.shutdown_confirm_timeout_s
        while True:
            try:
                replies, silent = await self.introspect(held_of=sorted(conversation_ids))
                if not silent and not any(r.still_held for r in replies):
                    return True
            except (RedisError, OSError) as exc:
                log.warning("could not ask the workers to confirm the shutdown cleanup: %s", exc)
            if time.monotonic() >= deadline:
                log.warning("workers did not confirm the shutdown cleanup within %.1f s", self.settings.shutdown_confirm_timeout_s)
                return False
            await asyncio.sleep(0.05)

    async def _refresh_directory(self) -> None:
        while True:
            try:
                await self.directory.refresh()
                self.recovery.worker_gaps()
                await self.rerouter.check()
            except (RedisError, OSError) as exc:
                log.warning("worker directory refresh failed: %s", exc)
            await asyncio.sleep(0.5)

    async def _deliver(self, channel: str, message: BusMessage) -> None:
        if isinstance(message, IntrospectReply):
            replies = self._introspections.get(message.request_id)
            if replies is not None:
                replies.append(message)
            return
        if isinstance(message, (TranscriptionResult, SpeechAudio, SpeechDone)):
            self.requests.deliver(message)
            return
        conversation = self.conversations.get(message.conversation_id)
        if conversation is None:
            with log_context(message.conversation_id, message.correlation_id):
                log.debug("dropped %s for a conversation not on this gateway", message.type)
            return
        conversation.deliver(message)

    # ---- conversation lifecycle
    async def ensure_ready(self) -> None:
        """Raise NotReady unless every stage has a live worker (and the gateway is not shutting down)."""
        if self.closing:
            raise NotReady("the gateway is shutting down")
        if self.directory.missing():
            await self.directory.refresh()
        if missing := self.directory.missing():
            raise NotReady(f"no live worker for: {', '.join(missing)}")

    async def serve_conversation(
        self,
        wire: Wire,
        run: Callable[[Conversation], Awaitable[str]],
        correlation_id: str,
        resume_id: str | None = None,
        resume_token: str | None = None,
    ) -> None:
        """The whole life of one conversation on an accepted socket: open it (a new one, or, with
        `resume_id` and `resume_token`, that conversation taken up again; its token rotates),
        serve it with the protocol's `run` (which returns the disconnect reason), and end it
        exactly once. A resume that cannot be taken is refused before anything is opened."""
        new_token = None
        if resume_id or resume_token:
            try:
                new_token = await self._claim(resume_id, resume_token)
            except ResumeRefused as exc:
                log.info("resume refused: %s", exc)
                await wire.refuse("unknown_conversation", str(exc), 4404, "unknown or expired conversation")
                return
            except NotReady as exc:  # nothing was opened or claimed: no disconnect event to publish
                log.warning("refusing the resume: %s", exc)
                await wire.refuse("not_ready", str(exc), 1011, "pipeline not ready")
                return
            except (RedisError, OSError) as exc:
                log.warning("resume failed: %s", exc)
                await wire.refuse("bus_unavailable", "the server cannot resume conversations now", 1011, "bus unavailable")
                return
        conversation_id = resume_id if new_token else str(uuid.uuid4())
        with log_context(conversation_id=conversation_id):
            reason, detail, connection_id, conversation = "client_disconnect", None, None, None
            try:
                route, token = await self.open_conversation(conversation_id, correlation_id, new_token)
                connection_id = route.connection_id
                log.info(
                    "conversation %s: vad_stt=%s llm=%s tts=%s",
                    "resumed" if new_token else "opened", route.vad_stt, route.llm, route.tts,
                )
                conversation = Conversation(self, route, token, wire, resumed=new_token is not None)
                self.conversations[conversation_id] = conversation
                reason = await conversation.serve(run)
                if conversation.shutting_down:
                    reason, detail = "server_error", "shutdown"
            except NotReady as exc:
                reason = "server_error"
                log.warning("refusing conversation: %s", exc)
                await wire.refuse(
                    "not_ready", str(exc), *((1001, "server shutting down") if self.closing else (1011, "pipeline not ready"))
                )
            except RedisError as exc:  # Redis went away while the conversation was opened
                reason = "server_error"
                log.warning("conversation failed: Redis is unreachable: %s", exc)
                await wire.refuse("bus_unavailable", "the message bus is down; try again in a moment", 1011, "bus unavailable")
            except asyncio.CancelledError:
                reason, detail = "server_error", "shutdown"
                raise
            except WebSocketDisconnect:  # the client left while it was being opened
                reason = "client_disconnect"
            except Exception:
                reason = "server_error"
                log.exception("connection failed")
                with contextlib.suppress(Exception):
                    await wire.close(1011, "internal error")
            finally:
                try:
                    await asyncio.shield(
                        self.end_conversation(conversation_id, correlation_id, reason, detail, connection_id=connection_id)
                    )
                finally:
                    # leave the registry only once the event is out: shutdown waits on the registry
                    if self.conversations.get(conversation_id) is conversation:
                        self.conversations.pop(conversation_id, None)

    async def _claim(self, conversation_id: str | None, token: str | None) -> str:
        """Check a resume request and claim the conversation; its rotated token."""
        if not (conversation_id and token):
            raise ResumeRefused("resuming needs both conversation_id and resume_token")
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ResumeRefused("unknown or expired conversation_id and resume_token")
        await self.ensure_ready()  # first: a resume that cannot be served keeps its token
        return await self.resume(conversation_id, token)

    async def open_conversation(
        self, conversation_id: str, correlation_id: str, resume_token: str | None = None
    ) -> tuple[Route, str]:
        """Assign a worker of each stage and write the routing lease; returns the route and the
        resume token to give the client (for a resume: the successor `resume` claimed)."""
        await self.ensure_ready()
        route = Route(
            conversation_id=conversation_id,
            correlation_id=correlation_id,
            connection_id=uuid.uuid4().hex,
            gateway=self.gateway_id,
            **{stage.value: self.directory.pick(stage).worker_id for stage in STAGES},
        )
        token = resume_token or secrets.token_urlsafe(24)
        conv_key, history_key = self.names.conversation(conversation_id), self.names.history(conversation_id)
        opened = self.bus.encode(route.opened())
        async with self.redis.pipeline(transaction=True) as pipe:  # the lease, then the announcement
            pipe.hset(conv_key, mapping=route.lease_to_write())
            pipe.expire(conv_key, self._lease_s)
            pipe.hset(history_key, RESUME_TOKEN_FIELD, token_digest(token))
            pipe.expire(history_key, self.settings.resume_window_s + self._lease_s)
            pipe.zadd(self.names.live, {conversation_id: now_ms() + self._lease_s * 1000})
            for inbox in route.inboxes(self.names):
                pipe.publish(inbox, opened)
            await pipe.execute()
        self.stats.current += 1
        self.stats.total += 1
        self.stats.peak = max(self.stats.peak, self.stats.current)
        return route, token

    async def resume(self, conversation_id: str, token: str) -> str:
        """Claim the conversation for a new socket: returns the rotated resume token, or raises
        ResumeRefused (unknown conversation, wrong or already used token, window passed).

        If the conversation's old socket is still registered (a client that moved networks before
        its old socket timed out), its gateway is told to close it, and its cleanup is awaited for
        up to TAKEOVER_WAIT_S; after that the new socket replaces it anyway, and the old socket's
        late end cannot touch the new lease. A gateway that is gone (killed: its inbox has no
        subscriber, so the takeover reached nobody, or it dies while waited for) is not waited
        for: the new socket replaces the old one at once, and opening it announces the new route
        (this gateway) to every stage."""
        successor = secrets.token_urlsafe(24)
        claimed = await self._claim_resume(
            keys=[self.names.history(conversation_id)],
            args=[RESUME_TOKEN_FIELD, token_digest(token), token_digest(successor)],
        )
        if not claimed:
            raise ResumeRefused("unknown or expired conversation_id and resume_token")
        route = await self.redis.hgetall(self.names.conversation(conversation_id))
        if not route:
            return successor
        takeover = SessionTakeover(
            conversation_id=conversation_id,
            correlation_id=route[b"correlation_id"].decode(),
            connection_id=route[b"connection_id"].decode(),
        )
        old_inbox = self.names.inbox(GATEWAY, route[b"gateway"].decode())
        receivers = await self.bus.publish(old_inbox, takeover)
        # a deadline checked in the loop, not a cancellation: a Redis call may swallow one (tasks.py)
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while receivers:
            if time.monotonic() >= deadline:
                log.warning("the conversation's old socket did not end in %.0f s; replacing it", TAKEOVER_WAIT_S)
                return successor
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(self.names.conversation(conversation_id))
                pipe.pubsub_numsub(old_inbox)
                held, [(_, receivers)] = await pipe.execute()
            if not held:
                return successor
            await asyncio.sleep(0.02)
        log.info("the conversation's previous gateway is gone; resuming at once")
        return successor

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
        try:  # one step: the lease goes (if it is this socket's) and the event goes out, in that order
            receivers = await self._end_conversation(
                keys=[self.names.conversation(conversation_id), self.names.live, self.names.history(conversation_id)],
                args=[
                    connection_id or "",
                    conversation_id,
                    self.settings.resume_window_s,
                    self.names.connection_events,
                    self.bus.encode(event),
                ],
            )
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
        self.stats.failures_by_reason[event.reason] += 1
        log.error("connection_disconnected could not be published; the workers' sweep will clean up")
        return False

    def _published(self, event: ConnectionDisconnected, receivers: int) -> None:
        self.stats.published += 1
        self.stats.published_by_reason[event.reason] += 1
        if receivers == 0:
            log.warning("connection_disconnected reached no subscriber; the workers' sweep will clean up")
        log.info("published connection_disconnected (%s) to %d subscribers", event.reason, receivers)

    async def refresh_lease(self, conversation_id: str) -> bool:
        """Extend the routing lease; False when it was gone (Redis lost it: see gateway/recovery.py)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(self.names.conversation(conversation_id), self._lease_s)
            pipe.expire(self.names.history(conversation_id), self.settings.resume_window_s + self._lease_s)
            pipe.zadd(self.names.live, {conversation_id: now_ms() + self._lease_s * 1000})
            extended, *_ = await pipe.execute()
        return bool(extended)

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
            if cid in self.conversations or await self.redis.exists(self.names.conversation(cid)):
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
    async def introspect(
        self, conversation_id: str = "", held_of: list[str] | None = None
    ) -> tuple[list[IntrospectReply], list[str]]:
        """Every live worker's answer, and the ids of live workers that did not answer in time."""
        await self.directory.refresh()
        expected = {w.worker_id for stage in STAGES for w in self.directory.workers[stage]}
        request_id = uuid.uuid4().hex
        replies: list[IntrospectReply] = []
        self._introspections[request_id] = replies
        try:
            request = IntrospectRequest(
                conversation_id=conversation_id, request_id=request_id, reply_to=self.inbox, held_of=held_of or []
            )
            await self.bus.publish(self.names.control, request)
            deadline = time.monotonic() + self.settings.introspect_timeout_s
            while time.monotonic() < deadline and not expected <= {r.worker_id for r in replies}:
                await asyncio.sleep(0.005)
        finally:
            self._introspections.pop(request_id, None)
        return replies, sorted(expected - {r.worker_id for r in replies})
