"""What every worker process shares: identity, heartbeat, subscriptions and conversation teardown.

A worker subscribes to its own inbox, to `connection_events`, to the control channel, and to any
extra channels of its stage. `connection_disconnected` is handled in the reader itself, ahead of
any queued data (control before data), and handling is idempotent.

Opening: the gateway announces every new socket with `conversation.opened` (the route) to the
worker of each stage, which prepares its state then, so a first turn waits for nothing. A message
for a conversation the worker does not hold (it missed the announcement, or restarted) is admitted
through `admit`, which requires the gateway's live routing for it.

Re-routing (gateway/reroute.py): when a worker of some stage dies, the conversation's gateway
moves it to a live replica and announces the new route with `conversation.opened` again. A worker
that holds the conversation follows the new route (`follow_route`); the new owner prepares it like
a resume. A worker only serves conversations whose lease names it for its stage: `admit` refuses
the others, and the sweep drops one that was moved away (its old owner was only slow, not dead),
so no message is served by two owners of a stage. A message to the next stage that reaches no
subscriber is lost: the worker tells the gateway (`stage_failed`), which ends that turn.

Fencing: once a conversation ends, messages for that socket (`connection_id`) are dropped, so late
input can never revive it (a resume opens a new socket, which is admitted again).

The bus is a boundary: a message that does not decode, or whose handling raises, is counted and
dropped by the subscriber (shared/bus.py), and the subscriber, heartbeat and sweep loops are
restarted if they ever end (shared/tasks.py `keep_running`), loudly logged.

Safety net: pub/sub is at-most-once, so every `sweep_interval` (and right after every re-subscribe)
the worker checks the routing lease of everything it holds; a conversation whose lease is gone or
belongs to another socket is cleaned as stale. The gateway deletes the lease before it publishes
the event and refreshes it while the socket lives, so a missed event is caught at the next sweep,
and a dead gateway's conversations within `STALE_TIMEOUT_S`."""
from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.bus import Bus, SubscriberStats, pool_stats, run_subscriber
from shared.channels import Names
from shared.clock import now_ms, now_ms_float
from shared.config import Settings
from shared.logging import log_context, redact_url
from shared.memory import trim_loop
from shared.messages import BusMessage, ConnectionDisconnected, ConversationOpened, IntrospectReply, IntrospectRequest
from shared.tasks import keep_running
from workers.metrics import WorkerMetrics
from workers.stats import WorkerStats

log = logging.getLogger("voicepipe.worker")

ENDED_MEMORY = 10_000  # ended sockets remembered for fencing (and their cleanup time, for admin)
ENDED_MEMORY_S = 120.0  # ... for at most this long: late messages arrive within milliseconds


@dataclass(frozen=True)
class Route:
    """Which process of each stage serves a conversation, written by the gateway at connect."""

    gateway: str
    vad_stt: str
    llm: str
    tts: str
    correlation_id: str
    connection_id: str

    @classmethod
    def of(cls, fields: Mapping[str, str]) -> "Route":
        """The route these fields name (a lease hash, a `conversation.opened`); KeyError if one is missing."""
        return cls(**{name: fields[name] for name in cls.__dataclass_fields__})


class Worker(abc.ABC):
    stage: ClassVar[str]

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.names = Names.from_settings(settings)
        self.worker_id = f"{self.stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.bus = Bus(client, self.worker_id)
        self.inbox = self.names.inbox(self.stage, self.worker_id)
        self.stats = WorkerStats()
        self.bus_stats = SubscriberStats()  # messages dropped at the bus boundary
        self.loop_restarts: dict[str, int] = {}  # long-lived loops that ended and were started again
        self.sweep_interval_s = max(0.2, min(5.0, settings.stale_timeout_s / 3))
        self._connections: dict[str, str] = {}  # conversation id -> connection id of the state held
        self._ended: OrderedDict[str, tuple[str | None, float]] = OrderedDict()  # id -> (socket, cleaned at ms)
        self._last_heartbeat_ms = 0
        self._suspects: set[str] = set()  # held conversations whose lease was missing at the last sweep
        self.closing = False  # shutting down: no new conversation is taken
        self.draining = False  # finishing what it holds before shutdown: heartbeats say so, gateways route nothing new here
        self.metrics = WorkerMetrics(self)  # its /metrics page, served on METRICS_PORT when set

    # ---- what each stage provides
    @abc.abstractmethod
    async def handle(self, channel: str, message: BusMessage) -> None: ...

    @abc.abstractmethod
    async def prepare(self, conversation_id: str, route: Route) -> None:
        """Create this stage's state for an admitted conversation, unless it is held already."""

    @abc.abstractmethod
    def follow_route(self, conversation_id: str, route: Route) -> None:
        """A held conversation was re-routed (another worker of some stage now serves it):
        address its next messages by `route`."""

    @abc.abstractmethod
    async def close_conversation(self, conversation_id: str) -> None:
        """Cancel and drop everything held for the conversation. Idempotent; unknown ids are harmless."""

    @abc.abstractmethod
    def conversation_ids(self) -> list[str]: ...

    @abc.abstractmethod
    def holds(self, conversation_id: str) -> dict[str, int]:
        """Counts of what this worker holds for one conversation (all 0 when nothing)."""

    def resources(self) -> dict[str, int]:
        """Counts of everything this worker holds."""
        return {"conversations": len(self.conversation_ids())}

    def extra_channels(self) -> list[str]:
        return []

    def heartbeat_info(self) -> dict[str, object]:
        return {}

    def pools(self) -> dict[str, dict[str, int]]:
        """Connection pools this process holds (admin `resources/pools`)."""
        return {"redis": pool_stats(self.redis)}

    async def load(self) -> None:
        """Load models before the worker announces itself (load once, serve many)."""

    # ---- lifecycle
    async def run(self) -> None:
        await self.load()
        try:
            async with asyncio.TaskGroup() as group:
                # restarted if they ever end: a bug or one bad input must never leave a worker
                # that still heartbeats but no longer reads its inbox (or the reverse)
                for name, loop in (("heartbeat", self._heartbeat_loop), ("sweep", self._sweep_loop), ("subscriber", self._subscribe)):
                    group.create_task(keep_running(name, loop, self.loop_restarts), name=f"{self.worker_id}:{name}")
                group.create_task(self._health_loop(), name=f"{self.worker_id}:health")
                group.create_task(self.metrics.serve(), name=f"{self.worker_id}:metrics")
                group.create_task(
                    trim_loop(
                        self.settings.memory_trim_interval_s,
                        lambda: self.stats.cleanup_ms.n,
                        lambda: not self.conversation_ids(),
                    ),
                    name=f"{self.worker_id}:memory-trim",
                )
        finally:
            await self.aclose()

    async def _subscribe(self) -> None:
        await run_subscriber(
            self.redis,
            [self.inbox, self.names.connection_events, self.names.control, *self.extra_channels()],
            self._dispatch,
            on_subscribed=self._catch_up,
            name=self.worker_id,
            stats=self.bus_stats,
        )

    async def aclose(self) -> None:
        """Shutdown: withdraw the heartbeat (no gateway routes a new conversation here), refuse new
        conversations, release every one held (Redis state included), log one summary line.
        Safe to call twice."""
        if self.closing:
            return
        self.closing = True
        started = time.perf_counter()
        held = self.conversation_ids()
        try:
            async with asyncio.timeout(2):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.delete(self.names.worker(self.stage, self.worker_id))
                    pipe.zrem(self.names.workers(self.stage), self.worker_id)
                    await pipe.execute()
        except Exception as exc:  # Redis gone at shutdown: the heartbeat key expires by itself
            log.warning("could not remove heartbeat: %s", exc)
        for conversation_id in held:
            with log_context(conversation_id):
                await self.end_conversation(conversation_id, "shutdown")
        log.info(
            "Shutdown cleanup completed: worker=%s, cleaned=%d conversations, remaining=%d, duration=%.1fms",
            self.worker_id, len(held), len(self.conversation_ids()), (time.perf_counter() - started) * 1000,
        )

    async def _dispatch(self, channel: str, message: BusMessage) -> None:
        with log_context(message.conversation_id or None, message.correlation_id):
            if isinstance(message, ConnectionDisconnected):
                self.stats.disconnect_events_received += 1
                held = self._connections.get(message.conversation_id)
                if message.connection_id and held and held != message.connection_id:
                    log.debug("ignored disconnect of an earlier socket of a resumed conversation")
                    return
                if await self.end_conversation(message.conversation_id, message.reason, message.connection_id):
                    self.stats.conversations_cleaned += 1
            elif isinstance(message, ConversationOpened):
                await self._open(message)
            elif isinstance(message, IntrospectRequest):
                await self._introspect(message)
            else:
                await self.handle(channel, message)

    async def _open(self, message: ConversationOpened) -> None:
        cid = message.conversation_id
        route = Route.of(message.model_dump())
        held = self._connections.get(cid)
        if held is not None and held != route.connection_id:  # state of an earlier socket whose end was missed
            await self.end_conversation(cid, "superseded by a new connection")
        elif held is not None and cid in self.conversation_ids():  # re-routed: another stage's worker changed
            if getattr(route, self.stage) == self.worker_id:
                self.follow_route(cid, route)
                log.info("conversation re-routed: vad_stt=%s llm=%s tts=%s", route.vad_stt, route.llm, route.tts)
            else:
                await self.end_conversation(cid, "re-routed to another worker")
            return
        if getattr(route, self.stage) != self.worker_id:
            return
        ended = self._ended.get(cid)
        if ended is not None and ended[0] == route.connection_id:
            # fenced: a late or replayed announcement opens nothing; only a live lease naming this
            # worker (the conversation was moved away from here and now back) lifts the fence
            live = await self.lookup_route(cid)
            if live is None or live.connection_id != route.connection_id or getattr(live, self.stage) != self.worker_id:
                return
            del self._ended[cid]
        if self._accept(cid, route):
            await self.prepare(cid, route)

    async def admit(self, message: BusMessage) -> bool:
        """Prepare state for a conversation this worker does not hold, from its live routing; False
        (the message is dropped) when the conversation is not, or no longer, connected."""
        route = await self.lookup_route(message.conversation_id)
        if route is not None and getattr(route, self.stage) != self.worker_id:
            log.debug("dropped %s: the conversation is routed to another %s worker", message.type, self.stage)
            return False
        if route is None or not self._accept(message.conversation_id, route):
            log.debug("dropped %s: conversation is not connected", message.type)
            return False
        await self.prepare(message.conversation_id, route)
        return True

    def _accept(self, conversation_id: str, route: Route) -> bool:
        """Record that this worker serves the conversation's socket, unless that socket has ended
        (or this worker is shutting down)."""
        if self.closing:
            return False
        ended = self._ended.get(conversation_id)
        if ended is not None and ended[0] == route.connection_id:
            return False
        self._ended.pop(conversation_id, None)
        self._connections[conversation_id] = route.connection_id
        self.stats.peak_conversations = max(self.stats.peak_conversations, len(self._connections))
        return True

    async def end_conversation(self, conversation_id: str, reason: str, connection_id: str | None = None) -> bool:
        """Fence and clean one conversation; returns whether anything was held for it."""
        socket_id = self._connections.pop(conversation_id, None) or connection_id
        known = conversation_id in self.conversation_ids()
        started = time.perf_counter()
        try:
            await self.close_conversation(conversation_id)
        except Exception:  # cleanup of one conversation must never stop the worker's reader
            log.exception("cleanup failed")
        if known or socket_id:
            now = now_ms_float()
            self._ended[conversation_id] = (socket_id, now)
            self._ended.move_to_end(conversation_id)
            while self._ended and (
                len(self._ended) > ENDED_MEMORY or next(iter(self._ended.values()))[1] < now - ENDED_MEMORY_S * 1000
            ):
                self._ended.popitem(last=False)
        if known:
            elapsed = (time.perf_counter() - started) * 1000
            self.stats.cleanup_ms.observe(elapsed)
            self.metrics.cleanup_seconds.observe(elapsed / 1000)
            log.info("conversation ended (%s); released everything in %.2f ms", reason, elapsed)
        return known

    async def lookup_route(self, conversation_id: str) -> Route | None:
        """The conversation's routing, or None when it is not (or no longer) connected."""
        fields = await self.redis.hgetall(self.names.conversation(conversation_id))
        if not fields:
            return None
        try:
            return Route.of({k.decode(): v.decode() for k, v in fields.items()})
        except (KeyError, UnicodeDecodeError) as exc:
            log.warning("conversation routing is incomplete or not UTF-8 (%s): treated as not connected", type(exc).__name__)
            return None

    # ---- safety net
    async def _catch_up(self) -> None:
        """After every (re)subscribe: clean at once what ended while the subscription was down."""
        if self.conversation_ids():
            await self.sweep(immediate=True)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except (RedisError, OSError) as exc:
                log.warning("stale sweep failed: %s", exc)

    async def sweep(self, immediate: bool = False) -> int:
        """Clean every held conversation whose routing lease is gone, names another socket, or
        names another worker of this stage (it was re-routed away while this one was unreachable).

        The gateway deletes a lease just before it publishes the event, so a lease missing once may
        only mean the event is a millisecond away; it counts as stale when missing at two sweeps in
        a row (or at once after a re-subscribe, when events may really have been lost)."""
        self.stats.sweeps += 1
        held = list(self.conversation_ids())
        stale: list[str] = []
        batch = max(1, self.settings.cleanup_batch_size)
        for start in range(0, len(held), batch):
            ids = held[start : start + batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.hmget(self.names.conversation(cid), "connection_id", self.stage)
                owners = await pipe.execute()
            for cid, (owner, served_by) in zip(ids, owners):
                mine = self._connections.get(cid)
                if (
                    owner is None
                    or (mine is not None and owner.decode(errors="replace") != mine)
                    or (served_by is not None and served_by.decode(errors="replace") != self.worker_id)
                ):
                    stale.append(cid)
        suspects, self._suspects = self._suspects, set()
        if not immediate:
            self._suspects = {cid for cid in stale if cid not in suspects}
            stale = [cid for cid in stale if cid in suspects]
        for cid in stale:
            if cid not in self.conversation_ids():
                continue  # its event arrived meanwhile
            with log_context(cid):
                log.warning("stale conversation (its disconnect event was missed or its gateway died)")
                if await self.end_conversation(cid, "stale"):
                    self.stats.stale_cleaned += 1
        return len(stale)

    # ---- introspection and health
    async def _introspect(self, request: IntrospectRequest) -> None:
        cid = request.conversation_id
        reply = IntrospectReply(
            conversation_id=cid,
            correlation_id=request.correlation_id,
            request_id=request.request_id,
            worker_id=self.worker_id,
            stage=self.stage,
            last_heartbeat_ms=self._last_heartbeat_ms,
            conversations=len(self.conversation_ids()),
            resources=self.resources(),
            holds=self.holds(cid) if cid else None,
            cleaned_ms=self._ended[cid][1] if cid in self._ended else None,
            stats={**self.stats.summary(), **self.bus_stats.summary(), "loop_restarts": sum(self.loop_restarts.values())},
            pools=self.pools(),
            still_held=sorted(set(request.held_of) & set(self.conversation_ids())),
        )
        await self.bus.publish(request.reply_to, reply)

    async def _health_loop(self) -> None:
        interval = self.settings.health_log_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            count = len(self.conversation_ids())
            line = f"health: conversations={count} peak={self.stats.peak_conversations} resources={self.resources()}"
            if count > self.settings.leak_warn_conversations:
                log.warning("%s above the leak threshold %d", line, self.settings.leak_warn_conversations)
            else:
                log.info(line)

    async def _heartbeat_loop(self) -> None:
        key = self.names.worker(self.stage, self.worker_id)
        index = self.names.workers(self.stage)
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        cpu_at, wall_at = time.process_time(), time.monotonic()
        while True:
            now = now_ms()
            cpu_now, wall_now = time.process_time(), time.monotonic()
            elapsed = wall_now - wall_at
            cpu = (cpu_now - cpu_at) / elapsed if elapsed >= 0.05 else 0.0  # cores busy since the last beat
            cpu_at, wall_at = cpu_now, wall_now
            payload = {
                "worker_id": self.worker_id,
                "stage": self.stage,
                "last_heartbeat_ms": now,
                "conversations": len(self.conversation_ids()),
                "resources": self.resources(),
                "stats": self.stats.heartbeat(),
                "cpu": round(cpu, 3),  # the gateway's pick weighs it (gateway/directory.py)
                "draining": self.draining,  # a draining worker gets no new conversation
                **self.heartbeat_info(),
            }
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, json.dumps(payload), px=ttl_ms)
                    pipe.zadd(index, {self.worker_id: now})
                    pipe.zremrangebyscore(index, 0, now - 10 * ttl_ms)
                    await pipe.execute()
                self._last_heartbeat_ms = now
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval_s)


async def serve(worker_cls: type[Worker], settings: Settings) -> None:
    from shared.bus import create_redis

    client = create_redis(settings.redis_url_or_default, settings.redis_max_connections, name=worker_cls.stage)
    try:
        worker = worker_cls(settings, client)
        log.info("starting %s on %s", worker.worker_id, redact_url(settings.redis_url_or_default))
        await worker.run()
    finally:
        await client.aclose()


def main(worker_cls: type[Worker], settings: Settings | None = None) -> None:
    """Run one worker until SIGINT or SIGTERM, then release everything and exit 0."""
    import signal

    from shared.logging import setup_logging

    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_format, worker_cls.stage)

    async def _main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(worker_cls, settings)
        except asyncio.CancelledError:
            log.info("stopped")

    try:
        import uvloop  # the faster event loop uvicorn also runs the gateway on
    except ImportError:
        asyncio.run(_main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main())
