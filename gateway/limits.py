"""The per-client connection limit (`MAX_CONNECTIONS_PER_CLIENT`, docs/protocol.md §1), counted in
Redis across every gateway process.

Why slots and not a counter: INCR on connect and DECR on close drifts for good the first time a
gateway dies without running its `finally` (SIGKILL, OOM, power): its connections are gone but
still counted, and the client is refused until someone repairs the number by hand. Here every
counted connection is a slot, `{client hash}: slot id -> gateway id`, and a slot counts only while
its gateway's heartbeat (`{ns}:gateways`, expiry on the Redis clock) is alive. So a killed
gateway stops counting against anyone once its heartbeat runs out (`STALE_TIMEOUT_S` at most),
whether or not any repair has run yet; the sweep then deletes what it left behind, in batches of
`CLEANUP_BATCH_SIZE`, and counts it (`stale_cleanup.connection_slots_repaired` in admin stats).

Atomicity: one Lua script reads the client's slots, drops those of dead gateways and adds the new
slot only if fewer than the limit are live, so any number of simultaneous connects through any
number of gateways admit exactly the limit; there is no read-then-write window.

Clocks: every expiry is written and compared on the Redis server's clock (TIME inside the
scripts), so gateways on machines whose clocks disagree still agree on who is alive.

Restarts: nothing else can listen on a host:port while a gateway does, so a gateway that has bound
one declares the gateway id registered there before it dead at once (`{ns}:gateway_endpoints`).
A gateway restarted after a SIGKILL therefore never refuses a client because of connections that
died with its predecessor, not even within `STALE_TIMEOUT_S`.

Self-healing: a gateway that finds its own heartbeat had expired (Redis unreachable for a while,
or a stall) writes its live slots back, since a sweep may have deleted them meanwhile. A slot whose
release failed (Redis down at that moment) is retried at every heartbeat until it goes."""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth import ClientIdentity
from shared.channels import Names
from shared.config import Settings

log = logging.getLogger("voicepipe.gateway.limits")

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the client's slot hash, KEYS[2] the gateway heartbeats, KEYS[3] this gateway's slot set
# ARGV[1] the limit, ARGV[2] new slot id, ARGV[3] this gateway's id, ARGV[4] the member for KEYS[3]
# returns {admitted (0|1), live slots after, dead slots dropped}
ADMIT = (
    "redis.replicate_commands()"
    + _NOW_MS
    + """
local slots = redis.call('HGETALL', KEYS[1])
local alive = {}
local live, dropped = 0, 0
for i = 1, #slots, 2 do
  local owner = slots[i + 1]
  if alive[owner] == nil then
    local expiry = redis.call('ZSCORE', KEYS[2], owner)
    alive[owner] = (expiry ~= false and expiry ~= nil and tonumber(expiry) > now)
  end
  if alive[owner] then
    live = live + 1
  else
    dropped = dropped + redis.call('HDEL', KEYS[1], slots[i])
  end
end
if live >= tonumber(ARGV[1]) then
  return {0, live, dropped}
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return {1, live + 1, dropped}
"""
)

# KEYS[1] the gateway heartbeats; ARGV[1] gateway id, ARGV[2] TTL in ms
# returns 1 if the heartbeat was still alive before this beat, else 0
HEARTBEAT = (
    "redis.replicate_commands()"
    + _NOW_MS
    + """
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if before ~= false and before ~= nil and tonumber(before) > now then
  return 1
end
return 0
"""
)

# KEYS[1] the gateway heartbeats; ARGV[1] how many; returns ids whose heartbeat has run out
EXPIRED = (
    _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# KEYS[1] the gateway heartbeats, KEYS[2] that gateway's slot set; ARGV[1] its id
# forgets a dead gateway once every slot of it is repaired (never one that came back)
FORGET = (
    "redis.replicate_commands()"
    + _NOW_MS
    + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry ~= false and expiry ~= nil and tonumber(expiry) > now then
  return 0
end
if redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
)

# KEYS[1] endpoint -> gateway id, KEYS[2] the gateway heartbeats; ARGV[1] endpoint, ARGV[2] our id
# returns the id of the predecessor declared dead, or false
CLAIM_ENDPOINT = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if before and before ~= ARGV[2] and redis.call('ZSCORE', KEYS[2], before) then
  redis.call('ZADD', KEYS[2], 0, before)
  return before
end
return false
"""


@dataclass(frozen=True)
class Slot:
    """One counted connection."""

    client_key: str
    slot_id: str

    @property
    def member(self) -> str:
        return f"{self.client_key} {self.slot_id}"


class LimitReached(Exception):
    """The client already holds `MAX_CONNECTIONS_PER_CLIENT` live connections."""

    def __init__(self, live: int) -> None:
        super().__init__(f"{live} connections open")
        self.live = live


class ConnectionLimits:
    def __init__(self, settings: Settings, client: aioredis.Redis, names: Names, gateway_id: str) -> None:
        self.limit = settings.max_connections_per_client
        self.enabled = self.limit > 0
        self.redis = client
        self.names = names
        self.gateway_id = gateway_id
        self.ttl_ms = max(1000, int(settings.stale_timeout_s * 1000))
        self.interval_s = max(0.2, settings.stale_timeout_s / 3)
        self.batch = max(1, settings.cleanup_batch_size)
        # a client refused now may retry after this: by then every slot of a dead gateway has stopped counting
        self.retry_after_s = max(1, math.ceil(settings.stale_timeout_s))
        self.repaired = 0  # slots of dead gateways deleted (by the sweep, or met by an admission)
        self.sweeps = 0
        self._held: dict[str, Slot] = {}  # slot id -> slot, every slot this gateway holds
        self._unreleased: dict[str, Slot] = {}  # releases that failed; retried at each heartbeat
        self._admit = client.register_script(ADMIT)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._expired = client.register_script(EXPIRED)
        self._forget = client.register_script(FORGET)
        self._claim_endpoint = client.register_script(CLAIM_ENDPOINT)

    @property
    def held(self) -> int:
        return len(self._held)

    # ---- admission
    async def acquire(self, identity: ClientIdentity) -> Slot:
        """Count one more connection of `identity`; raises LimitReached, or RedisError."""
        slot = Slot(identity.key, uuid.uuid4().hex)
        self._held[slot.slot_id] = slot  # before the script: if we are cancelled after it ran, aclose releases it
        try:
            admitted, live, dropped = await self._admit(
                keys=[self.names.client_slots(identity.key), self.names.gateways, self.names.gateway_slots(self.gateway_id)],
                args=[self.limit, slot.slot_id, self.gateway_id, slot.member],
            )
        except BaseException:
            self._unreleased[slot.slot_id] = self._held.pop(slot.slot_id)  # it may have been written
            raise
        self.repaired += int(dropped)
        if not admitted:
            self._held.pop(slot.slot_id, None)
            raise LimitReached(int(live))
        return slot

    async def release(self, slot: Slot) -> None:
        """Stop counting the connection; a failure is retried later, never raised."""
        self._held.pop(slot.slot_id, None)
        try:
            await self._delete([slot])
        except (RedisError, OSError) as exc:
            log.warning("could not release a connection slot (retried at the next heartbeat): %s", exc)
            self._unreleased[slot.slot_id] = slot
        else:
            self._unreleased.pop(slot.slot_id, None)

    async def _delete(self, slots: list[Slot]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for slot in slots:
                pipe.hdel(self.names.client_slots(slot.client_key), slot.slot_id)
                pipe.srem(self.names.gateway_slots(self.gateway_id), slot.member)
            await pipe.execute()

    # ---- liveness
    async def start(self) -> None:
        """The first heartbeat; until it is written this gateway's slots would not count."""
        if self.enabled:
            await self.beat()

    async def beat(self) -> None:
        was_alive = await self._heartbeat(keys=[self.names.gateways], args=[self.gateway_id, self.ttl_ms])
        if not was_alive and self._held:
            log.warning("this gateway's heartbeat had expired; writing back its %d connection slots", len(self._held))
            async with self.redis.pipeline(transaction=True) as pipe:
                for slot in list(self._held.values()):
                    pipe.hset(self.names.client_slots(slot.client_key), slot.slot_id, self.gateway_id)
                    pipe.sadd(self.names.gateway_slots(self.gateway_id), slot.member)
                await pipe.execute()
        if self._unreleased:
            pending = list(self._unreleased.values())
            await self._delete(pending)
            for slot in pending:
                self._unreleased.pop(slot.slot_id, None)

    async def run(self) -> None:
        """Heartbeat and sweep until cancelled (the gateway's TaskSet owns this)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
                await self.sweep()
            except (RedisError, OSError) as exc:
                log.warning("connection-limit heartbeat or sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Delete up to `CLEANUP_BATCH_SIZE` slots of gateways whose heartbeat ran out; any gateway
        may do it, and SPOP hands each slot to exactly one sweeper. Returns how many it deleted."""
        self.sweeps += 1
        budget, repaired = self.batch, 0
        for raw in await self._expired(keys=[self.names.gateways], args=[self.batch]):
            dead = raw.decode()
            if dead == self.gateway_id:
                continue  # ourselves, late: the next heartbeat writes our slots back
            slot_set = self.names.gateway_slots(dead)
            members = await self.redis.spop(slot_set, budget) or []
            if members:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for member in members:
                        client_key, _, slot_id = member.decode().partition(" ")
                        pipe.hdel(self.names.client_slots(client_key), slot_id)
                    repaired += sum(await pipe.execute())
                budget -= len(members)
            if budget > 0:  # everything it had is gone: forget it (unless it came back meanwhile)
                await self._forget(keys=[self.names.gateways, slot_set], args=[dead])
            if budget <= 0:
                break
        if repaired:
            log.info("repaired %d connection slots of gateways that died", repaired)
        self.repaired += repaired
        return repaired

    async def claim_endpoint(self, port: int) -> str | None:
        """Called once this gateway has bound `port`: the gateway that listened there before is
        dead (nothing else can hold the address), so its slots stop counting now."""
        if not self.enabled:
            return None
        endpoint = f"{socket.gethostname()}:{port}"
        before = await self._claim_endpoint(
            keys=[self.names.gateway_endpoints, self.names.gateways], args=[endpoint, self.gateway_id]
        )
        if before:
            predecessor = before.decode()
            log.info("gateway %s listened on %s before this one: its connection slots no longer count", predecessor, endpoint)
            await self.sweep()
            return predecessor
        return None

    async def aclose(self) -> None:
        """At shutdown, after the sessions ended: release what is left and withdraw the heartbeat."""
        if not self.enabled:
            return
        try:
            leftover = list(self._held.values()) + list(self._unreleased.values())
            if leftover:
                await self._delete(leftover)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.names.gateways, self.gateway_id)
                pipe.delete(self.names.gateway_slots(self.gateway_id))
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the heartbeat runs out by itself; the sweep repairs the rest
            log.warning("could not withdraw this gateway's connection slots: %s", exc)
        self._held.clear()
        self._unreleased.clear()
