"""Replica failure at the gateway: conversations whose worker died move to a live replica, and no
turn waits in silence for a dead process (docs/protocol.md §1 "When a worker dies").

The gateway that holds a conversation's socket owns its routing lease, so it alone re-routes it:
after every directory refresh (gateway/hub.py), each of its conversations routed to a worker that
is no longer live (heartbeat older than `WORKER_TTL_S`, or an inbox found without a reader) gets a
replica picked like a new conversation, and one Redis step (`REROUTE`) rewrites that stage of the
lease (only if the lease is still this socket's) and announces the new route with
`conversation.opened` to the worker of each stage. The new owner does not hold the conversation,
so it prepares it as for a resume (the orchestrator reads the history); the others hold it and
only change where they address the next stage (workers/runtime.py `follow_route`). Messages are
addressed by one route at a time, so none reaches two owners of a stage, and a worker that finds
the lease naming another worker of its stage drops the conversation (its sweep) and refuses its
messages (`admit`).

The turns a dead worker was serving are answered here at once with `error` `stage_failed` and an
empty `response.done`, and fenced, so a late piece of them never reaches the client. A message
that reached no subscriber (the gateway's own publish, or a worker's to the next stage, which the
worker reports as `stage_failed`) ends its turn the same way. With no live replica left, the
conversation is marked unavailable for that stage: its open turns and every turn tried meanwhile
get `stage_unavailable` at once, until a replica is back and the conversation is re-routed to it."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway.turns import Turn
from shared.logging import log_context
from shared.stages import STAGES, Stage

if TYPE_CHECKING:
    from gateway.conversation import Conversation
    from gateway.hub import Gateway

log = logging.getLogger("voicepipe.gateway.reroute")

STAGE_FAILED = "stage_failed"
STAGE_UNAVAILABLE = "stage_unavailable"
TURN_ENDING_CODES = frozenset({STAGE_FAILED, STAGE_UNAVAILABLE})
TELL_AGAIN_S = 1.0  # audio sent while a stage is unavailable: `stage_unavailable` at most this often

# KEYS[1] the lease; ARGV[1] the socket's connection id, ARGV[2] the stage, ARGV[3] its new worker,
# ARGV[4..n-1] the inboxes to announce the route to, ARGV[n] the announcement.
# 1: re-routed and announced; 0: the lease is gone or belongs to another socket (nothing done)
REROUTE = """
if redis.call('HGET', KEYS[1], 'connection_id') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
for i = 4, #ARGV - 1 do
  redis.call('PUBLISH', ARGV[i], ARGV[#ARGV])
end
return 1
"""


def in_flight_at(turn: Turn, stage: str) -> bool:
    """Whether the turn is waiting for work of that stage (so a death there loses it)."""
    if turn.done:
        return False
    if stage == Stage.VAD_STT:
        return not turn.typed and turn.transcript_ms is None
    if stage == Stage.LLM:
        return turn.replying and turn.text is None
    return turn.replying  # tts: a reply not done may still need audio


class Rerouter:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._reroute = gateway.redis.register_script(REROUTE)
        self.stats: Counter[str] = Counter()  # rerouted, turns_failed, turns_unavailable (admin stats)
        self._lock = asyncio.Lock()  # one check at a time: a conversation is moved once

    async def check(self) -> None:
        """Move every conversation of this gateway off workers that are no longer live.

        Not while Redis is down, nor until the inbox is subscribed again and has settled
        (gateway/recovery.py): a Redis that restarted without
        persistence lost every heartbeat too, so until the workers have beaten again they only look
        dead; the turns lost meanwhile are answered `bus_unavailable` by the recovery instead."""
        gateway = self.gateway
        if not gateway.bus_health.up or not gateway.inbox_live or gateway.recovery.settling():
            return
        directory = self.gateway.directory
        async with self._lock:
            live = {stage: directory.live(stage) for stage in STAGES}
            for conversation in list(self.gateway.conversations.values()):
                for stage in STAGES:
                    if conversation.route.worker(stage) not in live[stage]:
                        with log_context(conversation.conversation_id, conversation.correlation_id):
                            await self._move(conversation, stage)
                    elif stage in conversation.unavailable:  # its own worker is back (it re-subscribed)
                        conversation.unavailable.discard(stage)

    async def _move(self, conversation: Conversation, stage: str) -> None:
        dead = conversation.route.worker(stage)
        chosen = self.gateway.directory.pick(stage)
        if chosen is None:
            if stage not in conversation.unavailable:
                conversation.unavailable.add(stage)
                log.warning("no live %s worker left (%s is gone): the conversation waits for one", stage, dead)
                self.fail_turns(conversation, None, STAGE_UNAVAILABLE, f"no {stage} worker is available", dead)
            return
        route = conversation.route.moved(stage, chosen.worker_id)
        names = self.gateway.names
        moved = await self._reroute(
            keys=[names.conversation(conversation.conversation_id)],
            args=[route.connection_id, stage, chosen.worker_id, *route.inboxes(names), self.gateway.bus.encode(route.opened())],
        )
        if not moved:
            log.info("not re-routed: the conversation's lease is gone or belongs to another connection")
            return
        conversation.follow(route)
        self.stats["rerouted"] += 1
        if stage in conversation.unavailable:
            conversation.unavailable.discard(stage)
            log.info("%s is available again: conversation routed to %s", stage, chosen.worker_id)
        else:
            log.warning("%s worker %s is gone: conversation re-routed to %s", stage, dead, chosen.worker_id)
            self.fail_turns(conversation, stage, STAGE_FAILED, f"the {stage} worker serving this turn stopped", dead)

    def fail_turns(self, conversation: Conversation, stage: str | None, code: str, message: str, source: str) -> None:
        """End every open turn in flight at `stage` (every open turn when None) with `error` `code`."""
        for turn in conversation.turns.unfinished():
            if not turn.done and (stage is None or in_flight_at(turn, stage)):
                self.end_turn(conversation, turn, code, message, source)

    def end_turn(self, conversation: Conversation, turn: Turn, code: str, message: str, source: str | None) -> None:
        """`error` then an empty `response.done` for a turn that cannot complete; whatever still
        arrives for it is dropped."""
        self.stats["turns_failed" if code == STAGE_FAILED else "turns_unavailable"] += 1
        conversation.fail_turn(turn.turn_id, code, message, source)

    def refuse_turn(self, conversation: Conversation, turn: Turn) -> None:
        """A turn tried while a stage has no live worker: answered at once."""
        stages = ", ".join(sorted(conversation.unavailable))
        self.end_turn(conversation, turn, STAGE_UNAVAILABLE, f"no {stages} worker is available", None)

    def refuse_audio(self, conversation: Conversation) -> None:
        """Audio sent while a stage has no live worker is dropped; the client hears why, at most
        once every TELL_AGAIN_S."""
        now = time.monotonic()
        if now - conversation.unavailable_told < TELL_AGAIN_S:
            return
        conversation.unavailable_told = now
        stages = ", ".join(sorted(conversation.unavailable))
        conversation.emit("error", code=STAGE_UNAVAILABLE, message=f"no {stages} worker is available")

    async def unreached(self, conversation: Conversation, stage: str, turn: Turn | None) -> None:
        """A message to the conversation's `stage` worker reached no subscriber: it is lost, so its
        turn ends now, and the conversation moves at once if that worker has no reader."""
        if turn is not None and not turn.done:
            self.end_turn(
                conversation, turn, STAGE_FAILED, f"the {stage} worker serving this turn stopped", conversation.route.worker(stage)
            )
        await self.probe(conversation)

    async def probe(self, conversation: Conversation) -> None:
        """A message of the conversation was lost: every worker of it whose inbox has no reader
        counts as dead now, and the conversation moves off it at once."""
        directory = self.gateway.directory
        try:
            lost = [stage for stage in STAGES if not await directory.check_reachable(stage, conversation.route.worker(stage))]
            if lost:
                await self.check()
        except (RedisError, OSError) as exc:  # the directory's next refresh tries again
            log.warning("could not check the conversation's workers: %s", exc)
