"""Conversation history in Redis, kept for the resume window.

The conversation's preserved record is one hash, `{ns}:conv:{cid}:history`: field `messages` holds
the chat messages as a JSON list, field `resume_token` the gateway's token. One orchestrator owns
a conversation at a time, so read-modify-write of `messages` is safe.

The stored copy is held to the same budget as what the LLM sees (`HISTORY_MAX_MESSAGES` and
`HISTORY_MAX_CHARS`): a conversation of 10,000 turns, or of a few enormous ones, stores as much as
one within the budget. A message longer than half the character budget is cut to that half, so the
newest turn (a question and its reply) always fits and is never lost to one long message.

A reply that did not reach the user whole carries a `note`: "interrupted" (barge-in or cancel; its
content is only what the client was sent audio of) or "blocked" (the output guard stopped it). The
LLM sees the note as a marker after the content, so the next reply does not assume the user heard
the rest."""
from __future__ import annotations

import json

import redis.asyncio as aioredis

from shared.channels import Names

Message = dict[str, str]
MESSAGES_FIELD = "messages"
NOTES = {
    "interrupted": "[interrupted: the user heard only the text above]",
    "blocked": "[the rest of this reply was withheld]",
}


def for_llm(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as an OpenAI-compatible server takes them: role and content, notes rendered."""
    out = []
    for m in messages:
        note = NOTES.get(m.get("note", ""))
        content = m.get("content", "")
        out.append({"role": m["role"], "content": f"{content} {note}".strip() if note else content})
    return out


def _capped(message: Message, limit: int) -> Message:
    content = message.get("content", "")
    if len(content) <= limit:
        return message
    return {**message, "content": content[: max(0, limit - 1)] + "…"}


def trim(messages: list[Message], max_messages: int, max_chars: int) -> list[Message]:
    """Keep the newest messages within both budgets (a message longer than half of `max_chars` is
    cut to that half); the kept history never starts with a reply."""
    limit = max(1, max_chars // 2)
    kept = [_capped(m, limit) for m in messages[-max_messages:]] if max_messages > 0 and max_chars > 0 else []
    total = sum(len(m.get("content", "")) for m in kept)
    while kept and total > max_chars:
        total -= len(kept.pop(0).get("content", ""))
    while kept and kept[0].get("role") != "user":
        kept.pop(0)
    return kept


def parse(raw: bytes | str | None) -> list[Message]:
    """The stored messages; anything malformed is skipped, never fatal."""
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for the json module
        return []
    if not isinstance(items, list):
        return []
    return [
        {"role": str(m.get("role")), "content": m["content"], **({"note": m["note"]} if m.get("note") in NOTES else {})}
        for m in items
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    ]


class HistoryStore:
    def __init__(self, client: aioredis.Redis, names: Names, *, ttl_s: int, max_messages: int, max_chars: int) -> None:
        self._redis = client
        self._names = names
        self._ttl_s = ttl_s
        self._max_messages = max_messages
        self._max_chars = max_chars

    async def load(self, conversation_id: str) -> list[Message]:
        raw = await self._redis.hget(self._names.history(conversation_id), MESSAGES_FIELD)
        return trim(parse(raw), self._max_messages, self._max_chars)

    async def append(self, conversation_id: str, *messages: Message, replace_last: int = 0) -> None:
        """Add messages at the end, after dropping the last `replace_last` stored ones (a reply
        written whole that turned out to be interrupted is rewritten this way)."""
        key = self._names.history(conversation_id)
        stored = parse(await self._redis.hget(key, MESSAGES_FIELD))
        stored = trim(stored[: len(stored) - replace_last] + list(messages), self._max_messages, self._max_chars)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, MESSAGES_FIELD, json.dumps(stored))
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def keep_for_resume(self, conversation_id: str) -> None:
        await self._redis.expire(self._names.history(conversation_id), self._ttl_s)
