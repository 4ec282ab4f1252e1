"""The Redis bus: a bounded connection pool, typed publish, and a subscriber that never dies silently.

Pub/sub is at-most-once; what must not be lost on a missed message is covered by the lifecycle
safety net (heartbeats, leases and sweeps), never by hoping the subscriber was connected."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.messages import BusMessage
from shared.messages.codec import DecodeError, decode, encode

log = logging.getLogger("voicepipe.bus")

Handler = Callable[[str, BusMessage], Awaitable[None]]

DROP_WARN_INTERVAL_S = 10.0  # a subscriber warns about dropped messages at most this often, per kind


def create_redis(url: str, max_connections: int = 64, name: str | None = None) -> aioredis.Redis:
    """A client over a bounded pool: callers wait up to 5 s for a free connection instead of failing.

    `name` is set as CLIENT SETNAME on every connection, so operators can tell processes apart."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=10,
        client_name=name,
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


async def run_subscriber(
    client: aioredis.Redis,
    channels: Sequence[str],
    handle: Handler,
    *,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
    name: str = "subscriber",
    stats: SubscriberStats | None = None,
) -> None:
    """Deliver every message on `channels` to `handle`, in order, until cancelled.

    A dropped connection is retried with backoff (0.05 s doubling to 2 s) and logged. Each message
    is its own failure domain: one that does not decode, or whose handler raises, is counted in
    `stats`, logged briefly (never its payload) and skipped; only cancellation ends the loop.
    `on_subscribed` runs after every (re)subscribe, so the owner can catch up on what it may have
    missed."""
    stats = stats if stats is not None else SubscriberStats()
    backoff = 0.05
    while True:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*channels)
            if on_subscribed is not None:
                await on_subscribed()
            backoff = 0.05
            while True:
                raw = await pubsub.get_message(timeout=None)
                if raw is None:
                    continue
                stats.received += 1
                channel = raw["channel"].decode(errors="replace") if isinstance(raw["channel"], bytes) else raw["channel"]
                try:
                    message = decode(raw["data"])
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
                    stats.handler_failures += 1
                    if stats.should_warn("handler"):
                        log.exception("%s: handler failed for %s on %s (%d so far)", name, message.type, channel, stats.handler_failures)
                    else:
                        log.debug("%s: handler failed for %s on %s", name, message.type, channel, exc_info=True)
                # A burst of messages already buffered would otherwise be handled in one loop
                # iteration, holding back every other task (socket closes, cleanup) until it ends.
                await asyncio.sleep(0)
        except (RedisError, OSError) as exc:  # lost connection, refused AUTH, a Redis-side error
            log.warning("%s: Redis subscription lost (%s); resubscribing in %.2f s", name, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        finally:
            try:
                await asyncio.shield(pubsub.aclose())
            except Exception:  # the connection is already gone
                pass
