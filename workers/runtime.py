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

Draining (SIGTERM, `drain`): the heartbeat says `draining` at once, so gateways route no new
conversation here; each held conversation is handed to another live replica of the stage as soon
as its turn under way is done (or `DRAIN_TIMEOUT_S` has passed): `workers/handoff.py` rewrites its
lease and announces the new route to every stage and the gateway, in one Redis step. What still
arrives here for it (sent before the sender saw the new route) is forwarded to the new owner, in
the order it came, until no such message came for `FORWARD_GRACE_S`. Then the process exits 0. With
no other live replica, it releases everything and exits, as a plain shutdown does. A repeated
`conversation.opened` for the socket a worker holds is such a route change: it only repoints the
cached route.

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
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.bus import Bus, SubscriberStats, pool_stats, run_subscriber
from shared.channels import Names
from shared.clock import now_ms, now_ms_float
from shared.config import Settings
from shared.logging import log_context, redact_url
from shared.memory import trim_loop
from shared.messages import (
    BusMessage,
    ConnectionDisconnected,
    ConversationOpened,
    IntrospectReply,
    IntrospectRequest,
)
from shared.route import Route
from shared.stages import Stage
from shared.tasks import keep_running, log_running_tasks, stop_if_cancelled, stop_tasks
from workers.handoff import reroute
from workers.metrics import WorkerMetrics
from workers.stats import WorkerStats

log = logging.getLogger("voicepipe.worker")

ENDED_MEMORY = 10_000  # ended sockets remembered for fencing (and their cleanup time, for admin)
ENDED_MEMORY_S = 120.0  # ... for at most this long: late messages arrive within milliseconds
FORWARD_GRACE_S = 1.0  # a draining worker exits once nothing came to forward for this long
SHUTDOWN_REPORT_AFTER_S = 3.0  # past the drain timeout: a shutdown this late logs what it still waits for


class Worker(abc.ABC):
    stage: ClassVar[Stage]
    conversations: dict[str, Any]  # every stage's state per conversation; each value has a `route`

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
        self._beat_now = asyncio.Event()  # set to heartbeat before the interval is up (after a resubscribe)
        self._subscribed_ms = 0  # when the bus subscription was last (re)made; in the heartbeat
        self.closing = False  # shutting down: no new conversation is taken
        self.draining = False  # SIGTERM: handing every conversation to another replica, then exiting
        self._drain_requested = asyncio.Event()
        self.serving = False  # models loaded, inbox read: a SIGTERM before this stops at once
        self._handed: dict[str, tuple[str, str]] = {}  # handed-off conversation -> (its socket, new owner)
        self._last_forward = 0.0  # time.monotonic() of the last message forwarded to a new owner
        self._last_handoff = 0.0  # time.monotonic() of the last conversation handed to another replica
        self._open_forwards: set[tuple[str, str | None]] = set()  # turns forwarded in part: (conversation, turn)
        self._handling = asyncio.Lock()  # held while one bus message is handled; a hand-off happens between two
        self._cpu_at, self._wall_at = time.process_time(), time.monotonic()  # CPU use between heartbeats
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

    def busy(self, conversation_id: str) -> bool:
        """Whether a turn of the conversation is under way here (a draining worker hands the
        conversation off only once it is not)."""
        return False

    async def cut(self, conversation_id: str) -> None:
        """End the conversation's turns under way here, which a hand-off at the drain deadline
        abandons: the client gets `error` `stage_failed` and the turn's end, never silence."""

    async def release(self, conversation_id: str) -> None:
        """Drop the state of a conversation handed to another replica: it goes on elsewhere, so
        nothing is said to the other stages (unlike `close_conversation`)."""
        await self.close_conversation(conversation_id)

    def continues(self, message: BusMessage) -> bool:
        """Whether more messages of this message's turn follow it here (a draining worker keeps
        forwarding a turn it forwarded a part of until its end came)."""
        return False

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
        """Serve until cancelled, or until a requested drain is done (then return normally)."""
        await self.load()
        try:
            self.serving = True
            async with asyncio.TaskGroup() as group:
                tasks: list[asyncio.Task] = []
                # restarted if they ever end: a bug or one bad input must never leave a worker
                # that still heartbeats but no longer reads its inbox (or the reverse)
                for name, loop in (("heartbeat", self._heartbeat_loop), ("sweep", self._sweep_loop), ("subscriber", self._subscribe)):
                    tasks.append(group.create_task(keep_running(name, loop, self.loop_restarts), name=f"{self.worker_id}:{name}"))
                tasks.append(group.create_task(self._health_loop(), name=f"{self.worker_id}:health"))
                tasks.append(group.create_task(self.metrics.serve(), name=f"{self.worker_id}:metrics"))
                trim = trim_loop(
                    self.settings.memory_trim_interval_s,
                    lambda: self.stats.cleanup_ms.n,
                    lambda: not self.conversation_ids(),
                )
                tasks.append(group.create_task(trim, name=f"{self.worker_id}:memory-trim"))
                group.create_task(self._drain_when_requested(tasks), name=f"{self.worker_id}:drain")
        finally:
            await self.aclose()

    def request_drain(self) -> None:
        """SIGTERM: drain (see the module docstring), then `run` returns."""
        self._drain_requested.set()

    @property
    def drain_requested(self) -> bool:
        return self._drain_requested.is_set()

    async def wait_unless_draining(self, seconds: float) -> None:
        """Sleep `seconds`, or less if a drain is requested (a draining worker finishes its turns
        as fast as it can)."""
        try:
            await asyncio.wait_for(self._drain_requested.wait(), seconds)
        except TimeoutError:
            pass

    async def _drain_when_requested(self, tasks: list[asyncio.Task]) -> None:
        await self._drain_requested.wait()
        try:
            await self.drain()
        except (RedisError, OSError) as exc:  # the plain shutdown that follows still releases everything
            log.warning("drain stopped, Redis is unreachable: %s", exc)
        except Exception:
            log.exception("drain failed")
        # cancelled again while one still runs: a library may swallow one cancellation, and the
        # TaskGroup (so the shutdown cleanup after it) would wait for that task for ever
        await stop_tasks(tasks)

    async def drain(self) -> None:
        """Mark this worker draining, hand every conversation to another replica once its turn
        under way is done (at the latest after `DRAIN_TIMEOUT_S`), forward what still arrives for
        them, and return. With no other live replica, return at once (the shutdown releases all)."""
        self.draining = True
        started = time.monotonic()
        await self._beat()  # no gateway routes a new conversation here from now on
        if not await self._replicas():
            log.info("draining: no other live %s worker; releasing everything instead", self.stage)
            return
        deadline = started + self.settings.drain_timeout_s
        log.info("draining: handing %d conversations to other replicas", len(self.conversation_ids()))
        while True:
            now = time.monotonic()
            late = now >= deadline
            ready = [cid for cid in self.conversation_ids() if late or not self.busy(cid)]
            replicas = await self._replicas() if ready else {}
            for cid in ready:
                async with self._handling:  # never while a message of it is half handled
                    if cid in self.conversation_ids() and (late or not self.busy(cid)):
                        with log_context(cid):
                            await self._hand_off(cid, replicas, late)
            # a message sent here before its sender saw the new route may still be on its way: keep
            # forwarding for a grace period after the last hand-off and the last forward
            quiet = now - max(started, self._last_forward, self._last_handoff) >= FORWARD_GRACE_S and not self._open_forwards
            if (quiet and not self.conversation_ids()) or now >= deadline + FORWARD_GRACE_S:
                break
            await asyncio.sleep(0.02)
        log.info("drained in %.0f ms: %d conversations handed off", (time.monotonic() - started) * 1000, len(self._handed))

    async def _replicas(self) -> dict[str, int]:
        """The other live, non-draining workers of this stage: id -> conversations it holds."""
        # the gateway's heartbeat reader, as is
        from gateway.directory import WorkerDirectory

        directory = WorkerDirectory(self.redis, self.names, self.settings.worker_ttl_s)
        await directory.refresh()
        return {
            w.worker_id: w.conversations
            for w in directory.workers[self.stage]
            if not w.draining and w.worker_id != self.worker_id
        }

    async def _hand_off(self, conversation_id: str, replicas: dict[str, int], late: bool) -> None:
        """Move the conversation to the least-loaded of `replicas` (counting what it was handed);
        end it here when none takes it."""
        connection_id = self._connections.get(conversation_id)
        successor = min(replicas, key=lambda w: (replicas[w], w)) if replicas and connection_id else None
        moved = None
        if successor is not None:
            moved = await reroute(
                self.redis, self.bus, self.names, conversation_id, self.stage, self.worker_id, successor, connection_id
            )
        if moved is None:
            await self.end_conversation(conversation_id, "shutdown")
            return
        self._handed[conversation_id] = (connection_id, successor)
        self._last_handoff = time.monotonic()
        replicas[successor] += 1
        self._connections.pop(conversation_id, None)
        try:
            if late and self.busy(conversation_id):
                await self.cut(conversation_id)
            await self.release(conversation_id)
        except Exception:
            log.exception("releasing a handed-off conversation failed")
        log.info("handed to %s%s", successor, " at the drain timeout" if late else "")

    async def _forward(self, channel: str, message: BusMessage) -> bool:
        """Forward a message for a handed-off conversation to its new owner; False if it is not one."""
        handed = self._handed.get(message.conversation_id)
        if handed is not None and channel != self.inbox and self._open_forwards:
            # a stop on a shared channel (TTS control) ends a forwarded turn as its end would
            cid, turn_id = message.conversation_id, message.turn_id
            self._open_forwards = {t for t in self._open_forwards if t[0] != cid or turn_id not in (None, t[1])}
        if channel != self.inbox or handed is None:
            return False
        if isinstance(message, ConversationOpened):
            if message.connection_id != handed[0]:  # a new socket of it: served (and handed off) anew
                del self._handed[message.conversation_id]
                return False
            return True  # its route change, already known here
        self._last_forward = time.monotonic()
        turn = (message.conversation_id, message.turn_id)
        if self.continues(message):
            self._open_forwards.add(turn)
        else:
            self._open_forwards.discard(turn)
        await self.bus.publish(self.names.inbox(self.stage, handed[1]), message)
        return True

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
            "Shutdown cleanup completed: worker=%s, cleaned=%d conversations, remaining=%d, duration=%.1fms, handed_off=%d",
            self.worker_id, len(held), len(self.conversation_ids()), (time.perf_counter() - started) * 1000, len(self._handed),
        )

    async def _dispatch(self, channel: str, message: BusMessage) -> None:
        async with self._handling:
            await self._handle_one(channel, message)

    async def _handle_one(self, channel: str, message: BusMessage) -> None:
        with log_context(message.conversation_id or None, message.correlation_id):
            if self._handed and await self._forward(channel, message):
                return
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
        elif held is not None and cid in self.conversation_ids():  # re-routed: some stage's worker changed
            if getattr(route, self.stage) == self.worker_id:
                self.follow_route(cid, route)
                log.info("conversation re-routed: vad_stt=%s llm=%s tts=%s", route.vad_stt, route.llm, route.tts)
            else:  # this stage's part moved to another worker (a hand-off, or a re-route): it goes on there
                self._connections.pop(cid, None)
                await self.release(cid)
                log.info("conversation moved to %s", getattr(route, self.stage))
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
        (the message is dropped) when the conversation is not, or no longer, connected, and when
        its route names another worker of this stage (the message goes on to that one: its sender
        had not seen the route change yet)."""
        route = await self.lookup_route(message.conversation_id)
        owner = getattr(route, self.stage, self.worker_id)
        if owner != self.worker_id:
            log.debug("forwarded %s to the conversation's worker %s", message.type, owner)
            await self.bus.publish(self.names.inbox(self.stage, owner), message)
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

    async def end_conversation(
        self, conversation_id: str, reason: str, connection_id: str | None = None, *, fence: bool = True
    ) -> bool:
        """Fence and clean one conversation; returns whether anything was held for it. Unfenced
        (`fence=False`, the sweep's way), the same socket is admitted again if its lease comes back:
        only its gateway writes that lease, after Redis lost it (gateway/recovery.py)."""
        socket_id = self._connections.pop(conversation_id, None) or connection_id
        if not fence:
            socket_id = None
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
            return Route.of({k.decode(): v.decode() for k, v in fields.items()}, conversation_id)
        except (KeyError, UnicodeDecodeError) as exc:
            log.warning("conversation routing is incomplete or not UTF-8 (%s): treated as not connected", type(exc).__name__)
            return None

    # ---- safety net
    async def _catch_up(self) -> None:
        """After every (re)subscribe: heartbeat at once (after a Redis restart, gateways see this
        worker again without waiting for the interval) and clean at once what ended while the
        subscription was down. The heartbeat carries when this subscription was made, so a gateway
        sees that messages sent here before then may be lost (gateway/recovery.py)."""
        self._subscribed_ms = now_ms()
        self._beat_now.set()
        if self.conversation_ids():
            await self.sweep(immediate=True)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except (RedisError, OSError) as exc:
                stop_if_cancelled()  # redis-py can turn a cancelled call into a ConnectionError
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
                if await self.end_conversation(cid, "stale", fence=False):
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
        while True:
            self._beat_now.clear()
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                stop_if_cancelled()  # redis-py can turn a cancelled call into a ConnectionError
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(self._beat_now.wait(), self.settings.heartbeat_interval_s)
            except TimeoutError:
                pass

    def _cpu_since_last_beat(self) -> float:
        """Cores this process kept busy since the previous heartbeat (1.0: one core)."""
        cpu_now, wall_now = time.process_time(), time.monotonic()
        elapsed = wall_now - self._wall_at
        cpu = (cpu_now - self._cpu_at) / elapsed if elapsed >= 0.05 else 0.0
        self._cpu_at, self._wall_at = cpu_now, wall_now
        return cpu

    async def _beat(self) -> None:
        key = self.names.worker(self.stage, self.worker_id)
        index = self.names.workers(self.stage)
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        now = now_ms()
        payload = {
            "worker_id": self.worker_id,
            "stage": self.stage,
            "last_heartbeat_ms": now,
            "conversations": len(self.conversation_ids()),
            "resources": self.resources(),
            "stats": self.stats.heartbeat(),
            "subscribed_ms": self._subscribed_ms,
            "cpu": round(self._cpu_since_last_beat(), 3),  # the gateway's pick weighs it (gateway/directory.py)
            "draining": self.draining,  # a draining worker gets no new conversation
            **self.heartbeat_info(),
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(key, json.dumps(payload), px=ttl_ms)
            pipe.zadd(index, {self.worker_id: now})
            pipe.zremrangebyscore(index, 0, now - 10 * ttl_ms)
            await pipe.execute()
        self._last_heartbeat_ms = now


async def serve(worker_cls: type[Worker], settings: Settings, started: list[Worker] | None = None) -> None:
    """Run one worker; `started` (if given) receives it once it exists."""
    from shared.bus import create_redis

    client = create_redis(settings.redis_url_or_default, settings.redis_max_connections, name=worker_cls.stage)
    try:
        worker = worker_cls(settings, client)
        if started is not None:
            started.append(worker)
        log.info("starting %s on %s", worker.worker_id, redact_url(settings.redis_url_or_default))
        await worker.run()
    finally:
        await client.aclose()


def main(worker_cls: type[Worker], settings: Settings | None = None) -> None:
    """Run one worker until SIGINT (release everything) or SIGTERM (drain first; a second SIGTERM
    stops the drain), then exit 0. A shutdown still under way `SHUTDOWN_REPORT_AFTER_S` after the
    drain timeout logs what it waits for: every task's stack, then every thread's (on stderr)."""
    import faulthandler
    import signal

    from shared.logging import setup_logging

    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_format, worker_cls.stage)

    report_after_s = settings.drain_timeout_s + SHUTDOWN_REPORT_AFTER_S

    async def _main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        started: list[Worker] = []
        stopping: list[asyncio.TimerHandle] = []

        def terminate() -> None:
            if not stopping:  # a shutdown that takes too long says what it waits for
                stopping.append(loop.call_later(report_after_s, log_running_tasks, log, "shutdown is taking long"))
                faulthandler.dump_traceback_later(report_after_s + 1)  # and the threads' stacks, if the loop is stuck
            if started and started[0].serving and not started[0].drain_requested:
                started[0].request_drain()
            else:  # still loading models, or asked twice
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            await serve(worker_cls, settings, started)
        except asyncio.CancelledError:
            log.info("stopped")
        finally:
            for handle in stopping:
                handle.cancel()
            faulthandler.cancel_dump_traceback_later()

    try:
        import uvloop  # the faster event loop uvicorn also runs the gateway on
    except ImportError:
        asyncio.run(_main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main())
