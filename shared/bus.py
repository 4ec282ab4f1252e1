"""The Redis bus: a bounded connection pool, typed publish, and a subscriber that never dies silently.

Pub/sub is at-most-once; what must not be lost on a missed message is covered by the lifecycle
safety net (heartbeats, leases and sweeps), never by hoping the subscriber was connected.

Dropped and stale connections. When Redis restarts, every pooled connection is dead, and the
first command on each one would fail with `Connection closed by server`. So every client made by
`create_redis` retries a command that failed on a connection error or timeout (redis-py's `Retry`,
`RETRY_ATTEMPTS` more times, exponential backoff with jitter from `RETRY_BACKOFF_S`): the stale
connection is dropped, a new one is opened, the command is sent again. A restart is then invisible
to callers; an outage longer than the retries (about `RETRY_BUDGET_S`) still raises
`ConnectionError`, which every long-lived loop catches and goes on from.

What is retried is everything on the connection, so this is safe only because of what the project
sends: reads, writes of a whole value (SET, HSET, EXPIRE, ZADD, DEL), and Lua steps that are
idempotent or whose loss is covered (a resume claim that ran but whose answer was lost refuses the
client, who resumes again). A command is resent only when its answer never came; after a restart
Redis kept nothing of it. PUBLISH may then in rare cases deliver twice; every handler tolerates a
repeated message (the disconnect event, stops and cancels are idempotent; a repeated audio frame
or piece of a reply is a glitch, never a fault), which is cheaper than losing the one message that
ends a turn. Wrong credentials (`AuthenticationError`, a connection error) fail after the same
retries, a second or two late.

The subscriber (`run_subscriber`) sees both ways a subscription can drop: the error surfacing after
the retries, and redis-py reconnecting and resubscribing silently inside the retries (seen as a new
subscribe confirmation). Either way its owner is told (`on_lost`: messages may be lost) and then
catches up (`on_subscribed`).

How the subscriber reads: redis-py's `PubSub` subscribes and checks the connection's health, but
messages are read straight off its connection (`Connection.read_response`) rather than through
`PubSub.get_message`, which per message wraps the read in its retry machinery, builds a dict, awaits
an observability hook and, under RESP3 (redis-py's default protocol), formats the whole message
into a debug line in the default push handler. A read that fails raises at once and the subscriber
resubscribes on a fresh connection (the same path as any lost subscription). A burst already
buffered is handled without a task switch per message: the reader yields every `YIELD_AFTER_S`."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.messages import BusMessage
from shared.messages.codec import DecodeError, decode, encode
from shared.tasks import stop_if_cancelled

log = logging.getLogger("voicepipe.bus")

Handler = Callable[[str, BusMessage], Awaitable[None]]

DROP_WARN_INTERVAL_S = 10.0  # a subscriber warns about dropped messages at most this often, per kind
RETRY_ATTEMPTS = 2  # a command failed on a connection error is sent again up to this many times
RETRY_BACKOFF_S = (0.05, 0.5)  # base and cap of the wait before a retry (exponential, equal jitter)
_WAITS_S = sum(min(RETRY_BACKOFF_S[1], RETRY_BACKOFF_S[0] * 2**k) for k in range(1, RETRY_ATTEMPTS + 1))
# the longest a command keeps retrying while Redis is down (1.2 s): each of its tries retries the
# connect too (redis-py applies the same policy there), so the waits add up once per try, plus its own
RETRY_BUDGET_S = (RETRY_ATTEMPTS + 2) * _WAITS_S
RESUBSCRIBE_BACKOFF_S = (0.05, 0.5)  # a lost subscription is tried again this soon, doubling to the cap
YIELD_AFTER_S = 0.0002  # a subscriber handling a burst of buffered messages lets other tasks run this often


def command_retry() -> Retry:
    """The retry policy of every client: connection errors and timeouts, exponential backoff with jitter."""
    base, cap = RETRY_BACKOFF_S
    return Retry(EqualJitterBackoff(cap=cap, base=base), RETRY_ATTEMPTS, (RedisConnectionError, RedisTimeoutError))


def create_redis(url: str, max_connections: int = 64, name: str | None = None) -> aioredis.Redis:
    """A client over a bounded pool: callers wait up to 5 s for a free connection instead of failing.

    Commands that meet a dropped or stale connection are retried (`command_retry`, see above);
    a connection idle for 10 s is checked with PING before use; TCP keepalive finds dead peers
    (a `unix://` URL, a Unix socket on this machine, has no TCP to keep alive).
    `name` is set as CLIENT SETNAME on every connection, so operators can tell processes apart."""
    tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry=command_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        client_name=name,
        **tcp,
    )
    return aioredis.Redis(connection_pool=pool)


def pool_stats(client: aioredis.Redis) -> dict[str, int]:
    pool = client.connection_pool
    in_use = len(getattr(pool, "_in_use_connections", ()))
    available = len(getattr(pool, "_available_connections", ()))
    return {
        "max_connections": pool.max_connections,
        "in_use": in_use,
        "available": pool.max_connections - in_use,
        "created": in_use + available,
    }


class Bus:
    """Publishes typed messages as one process (`source`)."""

    def __init__(self, client: aioredis.Redis, source: str) -> None:
        self.redis = client
        self.source = source

    def encode(self, message: BusMessage) -> bytes:
        """The wire form of a message sent by this process (for publishing inside a pipeline)."""
        if not message.source:
            message.source = self.source
        return encode(message)

    async def publish(self, channel: str, message: BusMessage) -> int:
        return await self.redis.publish(channel, self.encode(message))

    async def publish_many(self, items: Sequence[tuple[str, BusMessage]]) -> list[int]:
        """Publish several messages in one round trip, in order; returns each one's receiver count."""
        if len(items) == 1:
            return [await self.publish(*items[0])]
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, message in items:
                pipe.publish(channel, self.encode(message))
            return await pipe.execute()


@dataclass
class SubscriberStats:
    """What one subscriber dropped: messages it could not decode, and messages its handler failed on."""

    received: int = 0
    undecodable: int = 0
    handler_failures: int = 0
    resubscribes: int = 0  # times the subscription dropped and was renewed
    _last_warned: dict[str, float] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, int]:
        return {
            "bus_messages_received": self.received,
            "bus_messages_undecodable": self.undecodable,
            "bus_handler_failures": self.handler_failures,
        }

    def should_warn(self, kind: str) -> bool:
        """At most one warning per kind every `DROP_WARN_INTERVAL_S`: a flood of garbage must not
        become a flood of log lines (the counters keep the exact figures)."""
        now = time.monotonic()
        if now - self._last_warned.get(kind, -DROP_WARN_INTERVAL_S) < DROP_WARN_INTERVAL_S:
            return False
        self._last_warned[kind] = now
        return True


async def _as_read(push: list) -> list:
    """The subscriber's handler of RESP3 pushes (its messages): hand each one back to the read
    as it came. redis-py's default handler formats every push into a debug log line first, even
    with debug logging off, which cost more than the rest of a message's way to its handler."""
    return push


async def run_subscriber(
    client: aioredis.Redis,
    channels: Sequence[str],
    handle: Handler,
    *,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
    on_lost: Callable[[], Awaitable[None]] | None = None,
    name: str = "subscriber",
    stats: SubscriberStats | None = None,
) -> None:
    """Deliver every message on `channels` to `handle`, in order, until cancelled.

    A dropped connection is retried with backoff (`RESUBSCRIBE_BACKOFF_S`) and logged. Each message
    is its own failure domain: one that does not decode, or whose handler raises, is counted in
    `stats`, logged briefly (never its payload) and skipped; only cancellation ends the loop.
    `on_lost` runs once each time the subscription drops (whatever was published meanwhile is
    lost to it), `on_subscribed` after every (re)subscribe, so the owner can catch up on what it
    may have missed. A failing callback is logged and retried with the subscription."""
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("run_subscriber reads raw replies: give it a client that does not decode them (create_redis)")
    stats = stats if stats is not None else SubscriberStats()
    backoff = RESUBSCRIBE_BACKOFF_S[0]
    expected = len(set(channels))  # subscribe confirmations that one SUBSCRIBE of `channels` brings
    subscribed = False  # the subscription is up (so losing it is news for `on_lost`)
    while True:
        pubsub = client.pubsub(push_handler_func=_as_read)
        try:
            await pubsub.subscribe(*channels)
            confirmations = expected  # the ones of this SUBSCRIBE, still to come
            if on_subscribed is not None:
                await on_subscribed()
            subscribed = True
            backoff = RESUBSCRIBE_BACKOFF_S[0]
            connection = pubsub.connection
            slice_started = time.perf_counter()
            while True:
                # A burst of messages already buffered is read without ever waiting on the socket,
                # so it would hold back every other task (socket writes, closes, cleanup) until it
                # ends: the reader steps aside once it has run for `YIELD_AFTER_S`.
                if time.perf_counter() - slice_started >= YIELD_AFTER_S:
                    await asyncio.sleep(0)
                    slice_started = time.perf_counter()
                await pubsub.check_health()  # redis-py's PING after an idle spell, as get_message does
                raw = await connection.read_response(timeout=math.inf, push_request=True)
                if not isinstance(raw, list) or len(raw) < 3 or raw[0] != b"message":
                    # a subscribe confirmation, a health-check pong, an unsubscribe
                    if isinstance(raw, list) and raw and raw[0] == b"subscribe":
                        if confirmations > 0:
                            confirmations -= 1
                        else:  # subscribed again under us (redis-py reconnected inside its retries)
                            confirmations = expected - 1
                            stats.resubscribes += 1
                            log.warning("%s: Redis subscription was lost and renewed; catching up", name)
                            if on_lost is not None:
                                await on_lost()
                            if on_subscribed is not None:
                                await on_subscribed()
                    continue
                stats.received += 1
                channel = raw[1].decode(errors="replace")
                try:
                    message = decode(raw[2])
                except DecodeError as exc:
                    stats.undecodable += 1
                    if stats.should_warn("undecodable"):
                        log.warning("%s: dropped an undecodable message on %s (%d so far): %s", name, channel, stats.undecodable, exc)
                    else:
                        log.debug("%s: dropped an undecodable message on %s: %s", name, channel, exc)
                    continue
                try:
                    await handle(channel, message)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    stop_if_cancelled()  # a library turned our cancellation into another error
                    stats.handler_failures += 1
                    if stats.should_warn("handler"):
                        log.exception("%s: handler failed for %s on %s (%d so far)", name, message.type, channel, stats.handler_failures)
                    else:
                        log.debug("%s: handler failed for %s on %s", name, message.type, channel, exc_info=True)
        except (RedisError, OSError) as exc:  # lost connection, refused AUTH, a Redis-side error
            stop_if_cancelled()  # redis-py can turn a cancelled read into a ConnectionError
            log.warning("%s: Redis subscription lost (%s); resubscribing in %.2f s", name, exc, backoff)
            if subscribed:
                subscribed = False
                stats.resubscribes += 1
                if on_lost is not None:
                    try:
                        await on_lost()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("%s: handling the lost subscription failed", name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF_S[1])
        finally:
            try:
                await asyncio.shield(pubsub.aclose())
            except Exception:  # the connection is already gone
                pass
