"""One bus hop: publish -> subscriber handler, through redis-py asyncio, with our codec on both ends.

    python -m bench.bus_hop [--messages 5000] [--redis-url URL]

Uses VOICEPIPE_REDIS_URL, else 127.0.0.1:6379, else an embedded redis-server."""
from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.stack import percentile
from shared.bus import Bus, create_redis, run_subscriber
from shared.logging import redact_url
from shared.messages import AudioIn, TtsSpeak
from tests.support.redis_server import TestRedis


async def run(url: str, n: int) -> None:
    publisher, subscriber = create_redis(url), create_redis(url)
    bus = Bus(publisher, "bench")
    channel = f"bench:{os.getpid()}"
    latencies: dict[str, list[float]] = {"audio.in": [], "tts.speak": []}
    got = asyncio.Event()
    ready = asyncio.Event()

    async def handle(_channel, message):
        latencies[message.type].append((time.perf_counter() - float(message.correlation_id)) * 1000)
        got.set()

    async def subscribed():
        ready.set()

    reader = asyncio.create_task(run_subscriber(subscriber, [channel], handle, on_subscribed=subscribed))
    await ready.wait()
    frame = bytes(640)
    for i in range(n):
        for make in (
            lambda: AudioIn(conversation_id="c", received_ms=0, pcm=frame, correlation_id=repr(time.perf_counter())),
            lambda: TtsSpeak(conversation_id="c", text="Hello there.", seq=i, correlation_id=repr(time.perf_counter())),
        ):
            got.clear()
            await bus.publish(channel, make())
            await got.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    print(f"bus hop over {redact_url(url)}, {n} messages each (ms): publish -> decoded in the subscriber's handler")
    for kind, values in latencies.items():
        print(f"  {kind:10} p50 {percentile(values, 50):.3f}   p99 {percentile(values, 99):.3f}")
    await publisher.aclose()
    await subscriber.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    server = None if args.redis_url else TestRedis()
    try:
        asyncio.run(run(args.redis_url or server.url, args.messages))
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
