"""A multi-process deployment for tests and benchmarks: gateways and worker replicas as real child
processes (`voicepipe gateway`, `voicepipe worker STAGE`) sharing one Redis, each logging to its own
file, so a test can SIGTERM, SIGKILL and restart any of them.

The VAD/STT and TTS replicas run with null models (`NULL_MODE`) so that a restart costs no model
load; the orchestrators talk to the OpenAI-compatible fake LLM the caller gives."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from shared.channels import Names
from voicepipe.embedded import free_port

STAGES = ("vad_stt", "llm", "tts")


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int | None = None  # gateways only

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            while (code := self.process.poll()) is None:
                await asyncio.sleep(0.02)
        return code


@dataclass
class Cluster:
    redis_url: str
    llm_base_url: str
    log_dir: Path
    settings: dict[str, str] = field(default_factory=dict)  # extra VOICEPIPE_ settings, by lower-case name
    namespace: str = field(default_factory=lambda: f"cluster-{uuid.uuid4().hex[:8]}")
    children: list[Child] = field(default_factory=list)
    _count: int = 0

    @property
    def names(self) -> Names:
        return Names(self.namespace, f"{self.namespace}:connection_events", f"{self.namespace}:tts_control")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
        env.update(
            VOICEPIPE_REDIS_URL=self.redis_url,
            VOICEPIPE_NAMESPACE=self.namespace,
            VOICEPIPE_CONNECTION_EVENTS_CHANNEL=self.names.connection_events,
            VOICEPIPE_TTS_CONTROL_CHANNEL=self.names.tts_control,
            VOICEPIPE_LLM_BASE_URL=self.llm_base_url,
            VOICEPIPE_HEARTBEAT_INTERVAL_S="0.2",
            VOICEPIPE_WORKER_TTL_S="2",
            VOICEPIPE_HEALTH_LOG_INTERVAL_S="0",
            VOICEPIPE_MEMORY_TRIM_INTERVAL_S="0",
            PYTHONUNBUFFERED="1",
        )
        env.update({f"VOICEPIPE_{k.upper()}": v for k, v in {**self.settings, **extra}.items()})
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int | None = None) -> Child:
        self._count += 1
        path = self.log_dir / f"{self._count:02d}-{name}.log"
        with open(path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "voicepipe", *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        child = Child(name, process, path, port)
        self.children.append(child)
        return child

    def start_gateway(self) -> Child:
        port = free_port()
        return self._spawn("gateway", ["gateway", "--port", str(port)], self.env(), port)

    def start_worker(self, stage: str) -> Child:
        extra = {"null_mode": "true"} if stage != "llm" else {}  # the orchestrator talks to the fake LLM
        return self._spawn(stage, ["worker", stage], self.env(**extra))

    async def heartbeat(self, client: aioredis.Redis, stage: str, pid: int) -> dict | None:
        """The live heartbeat record of the worker process `pid`, if it has one."""
        for raw in await client.zrange(self.names.workers(stage), 0, -1):
            worker_id = raw.decode()
            if f"-{pid}-" in worker_id:
                record = await client.get(self.names.worker(stage, worker_id))
                return json.loads(record) if record else None
        return None

    async def wait_heartbeat(self, client: aioredis.Redis, stage: str, child: Child, timeout: float = 60) -> dict:
        async with asyncio.timeout(timeout):
            while (beat := await self.heartbeat(client, stage, child.pid)) is None:
                assert child.alive(), child.log()[-3000:]
                await asyncio.sleep(0.05)
        return beat

    async def wait_ready(self, gateway: Child, timeout: float = 60) -> None:
        async with httpx.AsyncClient() as http, asyncio.timeout(timeout):
            while True:
                assert gateway.alive(), gateway.log()[-3000:]
                try:
                    if (await http.get(f"{gateway.http_url}/readyz", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)

    def stop_all(self) -> None:
        """SIGKILL whatever is still running (a test's own stops come first) and reap it."""
        for child in self.children:
            if child.alive():
                child.process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    async def delete_keys(self, client: aioredis.Redis) -> None:
        keys = [key async for key in client.scan_iter(match=f"{self.namespace}:*")]
        if keys:
            await client.delete(*keys)
