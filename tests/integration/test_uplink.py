"""The uplink and the bus subscriber on a real Redis: what their lean paths past redis-py's Pipeline
and PubSub.get_message must still do (gateway/uplink.py, shared/bus.py)."""
from __future__ import annotations

import asyncio
import time

import pytest

from gateway.uplink import Uplink
from shared.bus import create_redis, run_subscriber
from shared.messages import TextInput
from shared.messages.codec import encode
from tests.support.redis_server import RedisProcess


@pytest.fixture
def own_redis():
    server = RedisProcess()
    yield server
    server.stop()


def text(value: str) -> bytes:
    return encode(TextInput(conversation_id="c", text=value))


async def test_the_uplink_reads_every_reply_of_a_batch_past_one_redis_refused(own_redis):
    """A PUBLISH refused by Redis (here an ACL without that channel) is counted, the rest of its
    batch is published in order, and the next batch's replies are not mistaken for this one's."""
    admin = create_redis(own_redis.url)
    await admin.execute_command("ACL", "SETUSER", "uplink", "on", ">secret", "~*", "+@all", "resetchannels", "&open:*")
    user = create_redis(own_redis.url.replace("redis://", "redis://uplink:secret@"))
    heard: list[tuple[str, str]] = []
    subscribed = asyncio.Event()

    async def handle(channel, message):
        heard.append((channel, message.text))

    async def on_subscribed():
        subscribed.set()

    reader = asyncio.create_task(run_subscriber(admin, ["open:a", "closed:a"], handle, on_subscribed=on_subscribed))
    uplink = Uplink(user)
    flusher = asyncio.create_task(uplink.run())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        for channel, value in (("open:a", "1"), ("closed:a", "refused"), ("open:a", "2")):
            uplink.send(channel, text(value))  # one batch: queued without the flusher running
        async with asyncio.timeout(10):
            while uplink.refused == 0:
                await asyncio.sleep(0.01)
        uplink.send("open:a", text("3"))  # the next batch, on the same connection
        async with asyncio.timeout(10):
            while len(heard) < 3:
                await asyncio.sleep(0.01)
        assert heard == [("open:a", "1"), ("open:a", "2"), ("open:a", "3")]
        assert (uplink.refused, uplink.dropped) == (1, 0)
    finally:
        for task in (flusher, reader):
            task.cancel()
        await asyncio.gather(flusher, reader, return_exceptions=True)
        await user.aclose()
        await admin.aclose()


async def test_a_burst_of_buffered_messages_lets_other_tasks_run_before_it_ends(own_redis):
    """The subscriber no longer yields after every message: a burst already read off the socket
    must still not hold back the process's other tasks until its end."""
    client = create_redis(own_redis.url)
    burst = 300
    handled: list[str] = []
    seen_by_other_task: list[int] = []
    subscribed = asyncio.Event()

    async def handle(_channel, message):
        time.sleep(0.0002)  # a handler's own work, without awaiting anything
        handled.append(message.text)

    async def on_subscribed():
        subscribed.set()

    async def other_task():
        while len(handled) < burst:
            seen_by_other_task.append(len(handled))
            await asyncio.sleep(0)

    reader = asyncio.create_task(run_subscriber(client, ["burst"], handle, on_subscribed=on_subscribed))
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(burst):
                pipe.publish("burst", text(str(i)))
            await pipe.execute()
        other = asyncio.create_task(other_task())
        await asyncio.wait_for(other, 30)
        assert handled == [str(i) for i in range(burst)]
        assert any(0 < n < burst for n in seen_by_other_task), "no other task ran during the burst"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.aclose()
