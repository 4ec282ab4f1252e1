"""Whether Redis answers, as one process sees it: the answer a handshake or `/readyz` needs at once.

Asking Redis at each handshake would make every new client wait out the command retries
(shared/bus.py) while Redis is down, and a refusal must be quick. So one probe loop owns the
answer: a PING every `UP_INTERVAL_S` while Redis answers, every `DOWN_INTERVAL_S` while it does
not (so a Redis that is back is seen within a tenth of a second). The probe has a connection of
its own without retries and with short timeouts: it measures Redis, not the pool. Whatever else
in the process meets the outage first (the bus subscriber losing its connection) reports it with
`lost`, which marks Redis down at once and wakes the probe."""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("voicepipe.bus")

UP_INTERVAL_S = 1.0
DOWN_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 0.5


class BusHealth:
    def __init__(self, url: str) -> None:
        self._url = url
        self.up = True  # until a probe or a lost subscription says otherwise
        self.down_since: float | None = None  # time.monotonic() when Redis was last seen going away
        self.outages = 0
        self._wake = asyncio.Event()

    def lost(self, why: str) -> None:
        """Redis was seen unreachable by some other path: down now, and probe soon."""
        self._mark(False, why)
        self._wake.set()

    def _mark(self, up: bool, why: str = "") -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("Redis answers again (after %.1f s)", time.monotonic() - (self.down_since or time.monotonic()))
        else:
            self.down_since = time.monotonic()
            self.outages += 1
            log.warning("Redis is unreachable (%s): new connections are refused until it is back", why)

    async def run(self) -> None:
        """Probe until cancelled."""
        client = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            socket_timeout=PROBE_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )
        try:
            while True:
                self._mark(await self._probe(client), "no answer to PING")
                self._wake.clear()
                try:
                    async with asyncio.timeout(UP_INTERVAL_S if self.up else DOWN_INTERVAL_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            await asyncio.shield(client.aclose())

    @staticmethod
    async def _probe(client: aioredis.Redis) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S * 2):
                return bool(await client.ping())
        except (RedisError, OSError, TimeoutError):
            return False
