"""Moving one stage of a live conversation to another process: rewrite the routing lease, announce it.

The lease (`{ns}:conv:{cid}`) names the process of each stage that owns the conversation. Changing an
owner is one Redis step (`REROUTE`): the lease is rewritten only if it still holds the route the
caller read (same socket, same owners), and in the same step the new route goes out as
`conversation.opened` to the owner of every stage and to the gateway. The new owner prepares from
the history as at any opening; the others (a repeat for the socket they already hold) only point
their cached route at the new owner, so every message after the announcement reaches it. Nothing
is ever owned by two processes: a route that changed meanwhile (the socket ended or was resumed,
another move won) leaves the lease alone and the caller gets None.

`reroute` knows nothing of why the owner changes; a draining worker (workers/runtime.py) calls it
for each conversation it holds, and a dead replica's conversations can be moved the same way."""
from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis

from shared.bus import Bus
from shared.channels import Names
from shared.route import Route
from shared.stages import GATEWAY

log = logging.getLogger("voicepipe.handoff")

# KEYS[1] the lease; ARGV[1] the route read (JSON object of field -> value), ARGV[2] the stage,
# ARGV[3] its new owner, ARGV[4] the announcement, ARGV[5..] the inboxes it goes to.
# Returns the announcement's receivers, or -1 when the lease no longer holds the route read.
REROUTE = """
local expected = cjson.decode(ARGV[1])
for field, value in pairs(expected) do
  if redis.call('HGET', KEYS[1], field) ~= value then
    return -1
  end
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
local receivers = 0
for i = 5, #ARGV do
  receivers = receivers + redis.call('PUBLISH', ARGV[i], ARGV[4])
end
return receivers
"""


async def read_route(client: aioredis.Redis, names: Names, conversation_id: str) -> Route | None:
    """The conversation's route as stored, or None when it is not connected (or incomplete)."""
    raw = await client.hgetall(names.conversation(conversation_id))
    try:
        return Route.of({k.decode(): v.decode() for k, v in raw.items()}, conversation_id)
    except (KeyError, UnicodeDecodeError):
        return None


async def reroute(
    client: aioredis.Redis, bus: Bus, names: Names, conversation_id: str, stage: str, old: str, new: str,
    connection_id: str,
) -> Route | None:
    """Move `stage` of the conversation's socket `connection_id` from process `old` to `new`;
    returns the new route, or None when the lease no longer names `old` for that socket."""
    script = client.register_script(REROUTE)
    for _ in range(3):  # a refresh between the read and the step changes nothing; a real change ends it
        route = await read_route(client, names, conversation_id)
        if route is None or route.connection_id != connection_id or route.worker(stage) != old:
            return None
        moved = route.moved(stage, new)
        announcement = bus.encode(moved.opened())
        inboxes = [moved.inbox(GATEWAY, names), *moved.inboxes(names)]
        receivers = await script(
            keys=[names.conversation(conversation_id)],
            args=[json.dumps(route.lease()), stage, new, announcement, *inboxes],
        )
        if receivers >= 0:
            log.info("%s moved from %s to %s (announced to %d)", stage, old, new, receivers)
            return moved
    return None
