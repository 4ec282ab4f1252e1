"""The Redis bus: a bounded connection pool, typed publish, and a subscriber that never dies silently.

Pub/sub is at-most-once; what must not be lost on a missed message is covered by the lifecycle
safety net (heartbeats, leases and sweeps), never by hoping the subscriber was connected."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.messages import BusMessage
from shared.messages.codec import DecodeError, decode, encode

log = logging.getLogger("voicepipe.bus")

Handler = Callable[[str, BusMessage], Awaitable[None]]


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


async def run_subscriber(
    client: aioredis.Redis,
    channels: Sequence[str],
    handle: Handler,
    *,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
    name: str = "subscriber",
) -> None:
    """Deliver every message on `channels` to `handle`, in order, until cancelled.

    A dropped connection is retried with backoff (0.05 s doubling to 2 s) and logged; a bad message
    or a failing handler is logged and skipped. `on_subscribed` runs after every (re)subscribe, so
    the owner can catch up on what it may have missed."""
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
                channel = raw["channel"].decode() if isinstance(raw["channel"], bytes) else raw["channel"]
                try:
                    message = decode(raw["data"])
                except DecodeError as exc:
                    log.warning("%s: dropped a message on %s: %s", name, channel, exc)
                    continue
                try:
                    await handle(channel, message)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: handler failed for %s on %s", name, message.type, channel)
                # A burst of messages already buffered would otherwise be handled in one loop
                # iteration, holding back every other task (socket closes, cleanup) until it ends.
                await asyncio.sleep(0)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("%s: Redis subscription lost (%s); resubscribing in %.2f s", name, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        finally:
            try:
                await asyncio.shield(pubsub.aclose())
            except Exception:  # the connection is already gone
                pass
