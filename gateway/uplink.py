"""Client input on its way to the bus, pipelined: one flusher publishes what every session queued.

Awaiting one PUBLISH round trip per 20 ms audio frame costs each frame a trip through the event
loop and the Redis client; with hundreds of streams the frames then wait behind each other. Sessions
instead queue the encoded message without waiting, and one flusher sends everything queued so far
in a single pipeline, so a batch of frames from many sockets costs one round trip. Order is kept
(one queue, one flusher): a commit queued after a socket's audio reaches the VAD after that audio.
If Redis cannot take a batch it is dropped and logged (audio is real time: late audio is useless);
the queue is bounded, so a stalled Redis cannot grow the gateway's memory."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("voicepipe.gateway")

MAX_QUEUED = 20_000  # messages waiting for the flusher (400 streams x 1 s of 20 ms frames)
MAX_BATCH = 1_000


class Uplink:
    def __init__(self, client: aioredis.Redis, on_sent: Callable[[float], None] | None = None) -> None:
        self._redis = client
        self._queue: deque[tuple[str, bytes, float]] = deque()
        self._ready = asyncio.Event()
        self._on_sent = on_sent  # called with each message's ms from queued to published
        self.dropped = 0

    def send(self, channel: str, data: bytes, queued_at: float | None = None) -> bool:
        """Queue one encoded message; False when the queue is full (the message is dropped)."""
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return False
        self._queue.append((channel, data, time.perf_counter() if queued_at is None else queued_at))
        self._ready.set()
        return True

    async def run(self) -> None:
        """Flush until cancelled."""
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, data, _ in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self.dropped += len(batch)
                log.warning("could not publish %d client messages: %s", len(batch), exc)
                await asyncio.sleep(0.05)
                continue
            if self._on_sent is not None:
                now = time.perf_counter()
                for _, _, queued_at in batch:
                    self._on_sent((now - queued_at) * 1000)
