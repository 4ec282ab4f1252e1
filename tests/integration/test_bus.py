"""The bus over a real Redis: several messages in one round trip arrive in order, on their channels."""
from __future__ import annotations

import asyncio
import uuid

from shared.bus import Bus
from shared.messages import ResponseTextDelta, TtsSpeak
from shared.messages.codec import decode


async def test_publish_many_keeps_the_order_and_counts_receivers(redis_client):
    tts, gateway = f"t:{uuid.uuid4().hex}", f"g:{uuid.uuid4().hex}"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(tts, gateway)
    bus = Bus(redis_client, "test-source")
    items = [
        (tts, TtsSpeak(conversation_id="c", text="First piece.", seq=0)),
        (tts, TtsSpeak(conversation_id="c", text="Second piece.", seq=1)),
        (gateway, ResponseTextDelta(conversation_id="c", delta="piece.")),
        ("nobody-listens", ResponseTextDelta(conversation_id="c", delta="x")),
    ]
    assert await bus.publish_many(items) == [1, 1, 1, 0]
    heard = []
    async with asyncio.timeout(5):
        while len(heard) < 3:
            raw = await pubsub.get_message(timeout=1)
            if raw is not None:
                heard.append((raw["channel"].decode(), decode(raw["data"])))
    assert [(channel, m.type, getattr(m, "seq", None)) for channel, m in heard] == [
        (tts, "tts.speak", 0), (tts, "tts.speak", 1), (gateway, "response.text.delta", None),
    ]
    assert all(m.source == "test-source" for _, m in heard)
    assert await bus.publish_many(items[2:3]) == [1]
    await pubsub.aclose()
