"""Conversation history in Redis: a list of JSON chat messages, trimmed to a budget, kept under a TTL."""
from __future__ import annotations

import json

import redis.asyncio as aioredis

from shared.channels import Names

Message = dict[str, str]


def trim(messages: list[Message], max_messages: int, max_chars: int) -> list[Message]:
    """Keep the newest messages within both budgets; the kept history never starts with a reply."""
    kept = messages[-max_messages:] if max_messages > 0 else []
    total = sum(len(m.get("content", "")) for m in kept)
    while kept and total > max_chars:
        total -= len(kept.pop(0).get("content", ""))
    while kept and kept[0].get("role") != "user":
        kept.pop(0)
    return kept


class HistoryStore:
    def __init__(self, client: aioredis.Redis, names: Names, *, ttl_s: int, max_messages: int, max_chars: int) -> None:
        self._redis = client
        self._names = names
        self._ttl_s = ttl_s
        self._max_messages = max_messages
        self._max_chars = max_chars

    async def load(self, conversation_id: str) -> list[Message]:
        raw = await self._redis.lrange(self._names.history(conversation_id), 0, -1)
        messages = []
        for item in raw:
            try:
                message = json.loads(item)
            except ValueError:
                continue
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                messages.append({"role": str(message.get("role")), "content": message["content"]})
        return trim(messages, self._max_messages, self._max_chars)

    async def append(self, conversation_id: str, *messages: Message) -> None:
        key = self._names.history(conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(json.dumps(m) for m in messages))
            pipe.ltrim(key, -self._max_messages, -1)
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def keep_for_resume(self, conversation_id: str) -> None:
        await self._redis.expire(self._names.history(conversation_id), self._ttl_s)
