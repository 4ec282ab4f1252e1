"""What every worker process shares: identity, heartbeat, its subscriptions and conversation teardown.

A worker subscribes to its own inbox, to `connection_events`, and to any extra control channels.
`connection_disconnected` is handled in the reader itself, ahead of any queued data (control before
data); handling is idempotent and ended conversations are fenced so late input cannot revive them."""
from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import redis.asyncio as aioredis

from shared.bus import Bus, run_subscriber
from shared.channels import Names
from shared.clock import now_ms
from shared.config import Settings
from shared.logging import log_context
from shared.messages import BusMessage, ConnectionDisconnected

log = logging.getLogger("voicepipe.worker")

ENDED_MEMORY = 50_000  # how many ended conversation ids a worker remembers, to fence late messages


@dataclass(frozen=True)
class Route:
    """Which process of each stage serves a conversation (the gateway writes it at connect)."""

    gateway: str
    vad_stt: str
    llm: str
    tts: str
    correlation_id: str


class Worker(abc.ABC):
    stage: ClassVar[str]

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.names = Names.from_settings(settings)
        self.worker_id = f"{self.stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.bus = Bus(client, self.worker_id)
        self.inbox = self.names.inbox(self.stage, self.worker_id)
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.disconnect_events_handled = 0

    # ---- what each stage provides
    @abc.abstractmethod
    async def handle(self, channel: str, message: BusMessage) -> None: ...

    @abc.abstractmethod
    async def close_conversation(self, conversation_id: str) -> None:
        """Drop everything held for the conversation. Idempotent; unknown ids are harmless."""

    @abc.abstractmethod
    def conversation_ids(self) -> list[str]: ...

    def holds(self, conversation_id: str) -> dict[str, int]:
        """Counts of what this worker holds for one conversation."""
        return {}

    def resources(self) -> dict[str, int]:
        """Counts of everything this worker holds."""
        return {"conversations": len(self.conversation_ids())}

    def extra_channels(self) -> list[str]:
        return []

    def heartbeat_info(self) -> dict[str, object]:
        return {}

    async def load(self) -> None:
        """Load models before the worker announces itself (load once, serve many)."""

    # ---- lifecycle
    async def run(self) -> None:
        await self.load()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_loop(), name=f"{self.worker_id}:heartbeat")
                group.create_task(
                    run_subscriber(
                        self.redis,
                        [self.inbox, self.names.connection_events, *self.extra_channels()],
                        self._dispatch,
                        name=self.worker_id,
                    ),
                    name=f"{self.worker_id}:subscriber",
                )
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for conversation_id in self.conversation_ids():
            with log_context(conversation_id):
                await self.end_conversation(conversation_id, "shutdown")
        try:
            async with asyncio.timeout(2):
                await self.redis.delete(self.names.worker(self.stage, self.worker_id))
                await self.redis.zrem(self.names.workers(self.stage), self.worker_id)
        except Exception as exc:  # Redis gone at shutdown: the heartbeat key expires by itself
            log.warning("could not remove heartbeat: %s", exc)

    async def _dispatch(self, channel: str, message: BusMessage) -> None:
        with log_context(message.conversation_id, message.correlation_id):
            if isinstance(message, ConnectionDisconnected):
                self.disconnect_events_handled += 1
                await self.end_conversation(message.conversation_id, message.reason)
            elif message.conversation_id in self._ended:
                log.debug("dropped %s for ended conversation", message.type)
            else:
                await self.handle(channel, message)

    async def end_conversation(self, conversation_id: str, reason: str) -> None:
        self._ended[conversation_id] = None
        self._ended.move_to_end(conversation_id)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        known = conversation_id in self.conversation_ids()
        await self.close_conversation(conversation_id)
        if known:
            log.info("conversation ended (%s); released its resources", reason)

    def is_ended(self, conversation_id: str) -> bool:
        return conversation_id in self._ended

    async def lookup_route(self, conversation_id: str) -> Route | None:
        """The conversation's routing, or None when it is not (or no longer) connected."""
        fields = await self.redis.hgetall(self.names.conversation(conversation_id))
        if not fields:
            return None
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            return Route(**{name: decoded[name] for name in Route.__dataclass_fields__})
        except KeyError:
            log.warning("conversation routing is incomplete: %s", decoded)
            return None

    async def _heartbeat_loop(self) -> None:
        key = self.names.worker(self.stage, self.worker_id)
        index = self.names.workers(self.stage)
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        while True:
            now = now_ms()
            payload = {
                "worker_id": self.worker_id,
                "stage": self.stage,
                "last_heartbeat_ms": now,
                "conversations": len(self.conversation_ids()),
                "resources": self.resources(),
                "disconnect_events_handled": self.disconnect_events_handled,
                **self.heartbeat_info(),
            }
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, json.dumps(payload), px=ttl_ms)
                    pipe.zadd(index, {self.worker_id: now})
                    pipe.zremrangebyscore(index, 0, now - 10 * ttl_ms)
                    await pipe.execute()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval_s)


async def serve(worker_cls: type[Worker], settings: Settings) -> None:
    from shared.bus import create_redis

    client = create_redis(settings.redis_url_or_default, settings.redis_max_connections)
    try:
        worker = worker_cls(settings, client)
        log.info("starting %s", worker.worker_id)
        await worker.run()
    finally:
        await client.aclose()


def main(worker_cls: type[Worker], settings: Settings | None = None) -> None:
    """Run one worker until SIGINT or SIGTERM, then release everything and exit 0."""
    import signal

    from shared.logging import setup_logging

    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_format, worker_cls.stage)

    async def _main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(worker_cls, settings)
        except asyncio.CancelledError:
            log.info("stopped")

    asyncio.run(_main())
