"""The bus over a real Redis: several messages in one round trip arrive in order, on their channels."""
from __future__ import annotations

import asyncio
import uuid

from shared.bus import Bus
from shared.messages import ResponseTextDelta, TtsSpeak
from shared.messages.codec import decode, encode


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


async def test_a_subscriber_stops_when_cancelled_even_if_its_handler_turned_the_cancel_into_an_error(redis_client, settings):
    """redis-py can turn the cancellation of a Redis call into a ConnectionError; a subscriber that
    survives handler errors must still stop when it was cancelled (else a worker outlives SIGTERM)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from shared.bus import run_subscriber

    channel = f"{settings.namespace}:swallow"
    entered = asyncio.Event()

    async def handle(_channel, _message):
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None

    task = asyncio.create_task(run_subscriber(redis_client, [channel], handle, name="swallow"))
    async with asyncio.timeout(10):
        while not await redis_client.publish(channel, encode(TtsSpeak(conversation_id="c", text="x", seq=0))):
            await asyncio.sleep(0.02)
        await entered.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)
    assert done and task.cancelled()
