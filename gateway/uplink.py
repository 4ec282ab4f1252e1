"""Client input on its way to the bus, pipelined: one flusher publishes what every session queued.

Awaiting one PUBLISH round trip per 20 ms audio frame costs each frame a trip through the event
loop and the Redis client; with hundreds of streams the frames then wait behind each other. Sessions
instead queue the encoded message without waiting, and one flusher sends everything queued so far
in one write, so a batch of frames from many sockets costs one round trip. Order is kept (one
queue, one flusher): a commit queued after a socket's audio reaches the VAD after that audio.
If Redis cannot take a batch it is dropped and logged (audio is real time: late audio is useless);
the queue is bounded, so a stalled Redis cannot grow the gateway's memory.

The flusher holds one connection for its life and writes each batch with redis-py's own connection
calls (`send_packed_command`, `read_response`) instead of a `Pipeline` object per batch: the
pipeline's per-command bookkeeping (its command stack, response callbacks, per-PUBLISH
observability hooks, its reset and the pool round trip of every batch) cost more than the write
itself at 10,000 frames a second. Commands are packed by hiredis (`hiredis.pack_command`, what
redis-py's synchronous client packs with; its asyncio connection packs in Python, 6 times slower).
What the pipeline gave on a Redis restart is kept: a batch whose write or replies failed on a
connection error is sent again on a fresh connection under the client's retry policy
(shared/bus.py `command_retry`), and any error leaves the connection closed (redis-py closes it on
a failed read or write), so a half-read batch can never put one batch's replies in front of the
next one. A PUBLISH that Redis answers with an error is counted (`refused`) and the rest of its
batch's replies are still read."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("voicepipe.gateway")

MAX_QUEUED = 20_000  # messages waiting for the flusher (400 streams x 1 s of 20 ms frames)
MAX_BATCH = 1_000
WRITE_TIMEOUT_S = 5.0  # a batch not written and answered by then fails like a lost connection
# (redis-py's default socket timeout, applied once per batch instead of once per read)
PUBLISH = b"PUBLISH"


class Uplink:
    def __init__(self, client: aioredis.Redis, on_sent: Callable[[float], None] | None = None) -> None:
        self._redis = client
        self._queue: deque[tuple[str, bytes, float]] = deque()
        self._ready = asyncio.Event()
        self._on_sent = on_sent  # called with each message's ms from queued to published
        self.dropped = 0
        self.refused = 0  # messages Redis answered with an error (counted, not retried)

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
        # A connection of its own, made with the pool's settings (address, credentials, retry
        # policy, keepalive, client name) and connected on first use, so Redis being down when the
        # gateway starts is the same as Redis going down later. Its time limit is one per batch
        # (`WRITE_TIMEOUT_S`), not redis-py's per read and write, which costs a timer per reply and
        # a task per write.
        pool = self._redis.connection_pool
        connection: Connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        try:
            await self._flush_on(connection)
        finally:
            await asyncio.shield(connection.disconnect())

    async def _flush_on(self, connection: Connection) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._ready.clear()
                await self._ready.wait()
            batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            packed = [pack_command((PUBLISH, channel, data)) for channel, data, _ in batch]
            try:
                refused = await connection.retry.call_with_retry(
                    lambda: self._write(connection, packed, len(batch)),
                    lambda _error: connection.disconnect(),
                )
            except (RedisError, OSError) as exc:
                self.dropped += len(batch)
                log.warning("could not publish %d client messages: %s", len(batch), exc)
                await asyncio.sleep(0.05)
                continue
            if refused is not None:
                self.refused += len(refused)
                log.warning("Redis refused %d of %d client messages: %s", len(refused), len(batch), refused[0])
            if self._on_sent is not None:
                now = time.perf_counter()
                for _, _, queued_at in batch:
                    self._on_sent((now - queued_at) * 1000)

    @staticmethod
    async def _write(connection: Connection, packed: list[bytes], count: int) -> list[ResponseError] | None:
        """Send one packed batch and read its `count` replies, every one of them even past an
        error reply (the next batch must not read this one's); returns the error replies, if any."""
        refused: list[ResponseError] | None = None
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await connection.send_packed_command(packed)
                for _ in range(count):
                    try:
                        await connection.read_response()
                    except ResponseError as exc:
                        refused = (refused or []) + [exc]
        except TimeoutError:  # the cancelled read or write closed the connection (redis-py does)
            raise RedisTimeoutError(f"no answer from Redis to a batch of {count} within {WRITE_TIMEOUT_S} s") from None
        return refused
