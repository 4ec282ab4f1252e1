"""Conversations that outlive a Redis outage: their turns in flight end, their routing is written again.

Redis holds a conversation's routing lease, its place in `live` and its resume token's digest; a
Redis restarted without persistence has none of them, and every message published while the
gateway's subscription was down is lost. The gateway still has each socket and its route, so:

- When its inbox subscription drops (`bus_lost`), every turn in flight on every socket ends at
  once with `error` `bus_unavailable` and `response.done`, and is fenced (late output of it is
  dropped): its reply may never come, and the client must not wait for it. When the subscription
  is back (`bus_back`), so do the turns a client began meanwhile, whose replies had nowhere to go.
- A worker that lost its own subscription may have missed a message of a turn in flight just
  the same. Its heartbeat says when it last subscribed (`subscribed_ms`); when that moves on
  (`worker_gaps`, after each directory refresh), the turns routed to it that began before then end
  the same way, if they still wait for that stage (`waits_on`: a typed turn never waits for
  VAD/STT, a turn whose reply text is complete no longer waits for the orchestrator). Turns that
  began after it are left alone.
- A typed turn while the inbox is down or in the first `SETTLE_S` after it is back, and the first
  of a socket after an outage, waits (up to `SETTLE_S`) for the gateway's inbox to be subscribed
  again and the routing written (`settle`), and is re-sent while the
  orchestrator it goes to is not subscribed yet (`publish_when_heard`: no receiver means nobody
  got it, so sending again is safe), instead of being lost and ended with `bus_unavailable`.
- When the subscription is back, and whenever a socket's lease refresh finds its lease gone
  (`reestablish`), each conversation's routing is written again as it was (same workers, same
  socket id), and, if it was really gone, announced again with `conversation.opened`, so the user
  keeps talking. A worker that ended its part meanwhile (its sweep saw no lease) prepares it again; one
  that missed the announcement admits the conversation from the rewritten lease at its next message.
  The history lived in Redis too: a Redis without persistence forgets it, and the next reply starts
  from a fresh history.

The rewrite is one Lua step that only writes when the lease is absent or still names this socket,
so a conversation resumed on another socket meanwhile is never taken back."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.clock import now_ms
from shared.logging import log_context
from shared.messages import BusMessage
from shared.stages import STAGES, Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.conversation import Conversation
    from gateway.hub import Gateway
    from gateway.turns import Turn

log = logging.getLogger("voicepipe.gateway.recovery")

BUS_LOST_MESSAGE = "the message bus was interrupted; this turn was lost, the next one will work"

# KEYS[1] the lease, KEYS[2] live conversations, KEYS[3] the history hash
# ARGV[1] this socket's connection id, ARGV[2] lease TTL (s), ARGV[3] conversation id,
# ARGV[4] its `live` score (lease expiry, ms), ARGV[5] the token field, ARGV[6] the token digest,
# ARGV[7] the history TTL (s), ARGV[8] the `conversation.opened` payload, ARGV[9] n inboxes,
# ARGV[10 .. 9+n] the inboxes to announce it to, then the route as field, value pairs.
# 2: the lease was there (its TTLs refreshed), 1: written again and announced, 0: another socket holds it
REESTABLISH = """
local holder = redis.call('HGET', KEYS[1], 'connection_id')
if holder and holder ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[9])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
if holder then
  redis.call('EXPIRE', KEYS[1], ttl)
  return 2
end
for i = 10 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ttl)
for i = 10, 9 + n do
  redis.call('PUBLISH', ARGV[i], ARGV[8])
end
return 1
"""

def waits_on(turn: Turn, stage: str) -> bool:
    """Whether the turn still needs a message from a worker of `stage` (so lost one if it missed it)."""
    if stage == Stage.VAD_STT:
        return not turn.typed and turn.transcript_ms is None
    if stage == Stage.LLM:
        return turn.text is None
    return not turn.audio_done


SETTLE_S = 2.0  # how long the first turn after an outage waits for the bus to be whole again
FORGET_WORKER_S = 600.0  # a worker's last subscription time is kept this long after its last heartbeat


class Recovery:
    """The gateway's answer to a Redis outage (one per gateway)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._script = gateway.redis.register_script(REESTABLISH)
        self.reestablished = 0  # conversations whose lost routing was written again
        self.turns_failed = 0  # turns in flight ended with bus_unavailable
        self._subscribed: dict[str, tuple[int, float]] = {}  # worker id -> (subscribed_ms, last seen)
        self._back_at: float | None = None  # time.monotonic() when the inbox was last subscribed again

    def settling(self) -> bool:
        """The inbox was subscribed again within `SETTLE_S`: workers may still be subscribing."""
        return self._back_at is not None and time.monotonic() - self._back_at < SETTLE_S

    def bus_lost(self, why: str) -> None:
        """The inbox subscription dropped: end every turn in flight, on every socket; until its
        routing is written again, a socket writes it before it sends anything more."""
        self._gateway.bus_health.lost(why)
        for conversation in self._gateway.conversations.values():
            conversation.routing_unsure = True
        self._fail(self._gateway.conversations.values())

    async def bus_back(self) -> None:
        """Subscribed again: end the turns begun while the inbox was deaf, write lost routing again."""
        self._back_at = time.monotonic()
        self._fail(self._gateway.conversations.values())
        await self.reestablish_all()

    def worker_gaps(self) -> list[str]:
        """After a directory refresh: end the turns routed to a worker that subscribed again since
        they began. Returns the ids of those workers."""
        now = time.monotonic()
        moved: dict[str, int] = {}
        for workers in self._gateway.directory.workers.values():
            for info in workers:
                before = self._subscribed.get(info.worker_id)
                if before is not None and 0 < before[0] < info.subscribed_ms:
                    moved[info.worker_id] = info.subscribed_ms
                if before is None or info.subscribed_ms >= before[0]:
                    self._subscribed[info.worker_id] = (info.subscribed_ms, now)
                else:
                    self._subscribed[info.worker_id] = (before[0], now)
        for worker_id in [w for w, (_, seen) in self._subscribed.items() if now - seen > FORGET_WORKER_S]:
            del self._subscribed[worker_id]
        for worker_id, since_ms in moved.items():
            log.warning("worker %s subscribed again: its turns in flight may have lost messages", worker_id)
            for conversation in list(self._gateway.conversations.values()):
                for stage in STAGES:
                    if conversation.route.worker(stage) == worker_id:
                        self._fail([conversation], lambda turn, stage=stage, since=since_ms: turn.opened_ms < since and waits_on(turn, stage))
        return list(moved)

    def _fail(self, conversations: Iterable[Conversation], which: Callable[[Turn], bool] | None = None) -> None:
        for conversation in list(conversations):
            with log_context(conversation.conversation_id, conversation.correlation_id):
                self.turns_failed += conversation.fail_turns_in_flight("bus_unavailable", BUS_LOST_MESSAGE, which)

    async def settle(self, conversation: Conversation) -> None:
        """Wait (bounded) until the inbox is subscribed again, then write the socket's routing."""
        gateway = self._gateway
        try:
            async with asyncio.timeout(SETTLE_S):
                while not gateway.inbox_live:
                    await asyncio.sleep(0.02)
                await self.reestablish([conversation])
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("the bus has not settled yet (%s); the turn goes out anyway", type(exc).__name__)

    async def publish_when_heard(self, channel: str, message: BusMessage) -> None:
        """Publish until some subscriber receives it, for up to `SETTLE_S`; raises ConnectionError
        if none did by then."""
        deadline = time.monotonic() + SETTLE_S
        delay = 0.02
        while not await self._gateway.bus.publish(channel, message):
            if time.monotonic() + delay > deadline:
                raise RedisConnectionError("no worker listens on its inbox yet")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def reestablish(self, conversations: list[Conversation]) -> int:
        """Write each conversation's routing again where it is gone; returns how many were."""
        written = 0
        for conversation in conversations:
            if conversation.ended:
                continue
            with log_context(conversation.conversation_id, conversation.correlation_id):
                outcome = await self._reestablish(conversation)
                conversation.routing_unsure = False
                if outcome == 1:
                    written += 1
                    conversation.announce_settings()  # a worker that prepares it again must not use the defaults
                    log.warning("conversation routing was lost with Redis; written again and announced")
                elif outcome == 0:
                    log.info("conversation routing names another socket now; not written again")
        self.reestablished += written
        return written

    async def reestablish_all(self) -> None:
        await self.reestablish(list(self._gateway.conversations.values()))

    async def _reestablish(self, conversation: Conversation) -> int:
        from gateway.hub import RESUME_TOKEN_FIELD, token_digest

        gateway, cid, route = self._gateway, conversation.conversation_id, conversation.route
        names, lease_s = gateway.names, max(1, int(gateway.settings.stale_timeout_s))
        opened = gateway.bus.encode(route.opened())
        inboxes = route.inboxes(names)
        fields = [item for pair in route.lease_to_write().items() for item in pair]
        return int(
            await self._script(
                keys=[names.conversation(cid), names.live, names.history(cid)],
                args=[
                    route.connection_id,
                    lease_s,
                    cid,
                    now_ms() + lease_s * 1000,
                    RESUME_TOKEN_FIELD,
                    token_digest(conversation.resume_token),
                    gateway.settings.resume_window_s + lease_s,
                    opened,
                    len(inboxes),
                    *inboxes,
                    *fields,
                ],
            )
        )

