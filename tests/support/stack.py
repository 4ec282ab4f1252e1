"""The whole pipeline in the test's own process: the real gateway under uvicorn on a free port and
the three real workers, each with its own Redis connection pool, joined only by Redis."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis

from gateway.__main__ import GatewayServer, build_server
from shared.bus import create_redis
from shared.config import Settings
from voicepipe.embedded import free_port
from workers.llm_orchestrator.handler import LlmWorker
from workers.llm_orchestrator.llm_client import ChatClient
from workers.llm_orchestrator.slices import scheduled
from workers.runtime import Worker
from workers.tts.handler import TtsWorker
from workers.vad_stt.handler import VadSttWorker


@dataclass
class Stack:
    settings: Settings
    port: int
    server: GatewayServer
    workers: dict[str, Worker] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def gateway(self):
        return self.server.config.app.state.gateway


async def wait_ready(http_url: str, timeout: float = 20.0, without_llm: bool = False) -> None:
    """Until /readyz says 200 (`without_llm`: or only that no LLM server answers yet)."""
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
        while True:
            try:
                answer = await client.get(f"{http_url}/readyz")
                if answer.status_code == 200 or (without_llm and answer.json().get("missing") == ["llm_server"]):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run_stack(
    settings: Settings,
    *,
    transcriber=None,
    voice=None,
    llm_base_url: str | None = None,
    stages=("vad_stt", "llm", "tts"),
    metrics_ports: dict[str, int] | None = None,
) -> AsyncIterator[Stack]:
    """`metrics_ports`: stage -> the METRICS_PORT of that worker (its own /metrics); the rest serve none."""
    port = free_port()
    server = build_server(settings, "127.0.0.1", port)
    stack = Stack(settings, port, server)
    clients: list[aioredis.Redis] = []
    tasks: list[asyncio.Task] = []

    def client(name: str) -> aioredis.Redis:
        clients.append(create_redis(settings.redis_url_or_default, settings.redis_max_connections, name=name))
        return clients[-1]

    def of(stage: str) -> Settings:
        port = (metrics_ports or {}).get(stage, 0)
        return settings.model_copy(update={"metrics_port": port}) if port else settings

    makers = {
        "vad_stt": lambda: VadSttWorker(of("vad_stt"), client(f"{settings.namespace}-vad_stt"), transcriber=transcriber),
        "llm": lambda: LlmWorker(
            of("llm"),
            client(f"{settings.namespace}-llm"),
            chat=scheduled(
                ChatClient.from_settings(settings, base_url=llm_base_url or "http://127.0.0.1:9/v1", model="fake"),
                settings,
            ),
        ),
        "tts": lambda: TtsWorker(of("tts"), client(f"{settings.namespace}-tts"), voice=voice),
    }
    try:
        for stage in stages:
            worker = stack.workers[stage] = makers[stage]()
            tasks.append(asyncio.create_task(worker.run(), name=f"test-{stage}"))
        tasks.append(asyncio.create_task(server.serve(), name="test-gateway"))
        async with asyncio.timeout(20):
            while not server.started:
                await asyncio.sleep(0.01)
        if len(stages) == 3:  # every worker live; whether the LLM server answers is the test's business
            await wait_ready(stack.http_url, without_llm=True)
        yield stack
    finally:
        server.should_exit = True
        for task in tasks[:-1]:
            task.cancel()
        await asyncio.wait(tasks, timeout=15)
        for c in clients:
            await c.aclose()
