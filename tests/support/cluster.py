"""A multi-process deployment for tests and benchmarks: gateways and worker replicas as real child
processes (`voicepipe gateway`, `voicepipe worker STAGE`) sharing one Redis, each logging to its own
file, so a test can SIGTERM, SIGKILL and restart any of them. The one harness of the draining,
rolling-restart and replica-failure tests and benchmarks.

The VAD/STT and TTS replicas run with null models (`NULL_MODE`) so that a restart costs no model
load; the orchestrators talk to the OpenAI-compatible fake LLM the caller gives. Every gateway
takes `ADMIN_KEY` for its admin API."""
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
from shared.stages import STAGES
from voicepipe.embedded import free_port

ADMIN_KEY = "cluster-" + uuid.uuid4().hex


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

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait for the exit (SIGKILL after 15 s); returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@dataclass
class Cluster:
    redis_url: str
    llm_base_url: str
    log_dir: Path
    settings: dict[str, str] = field(default_factory=dict)  # extra VOICEPIPE_ settings, by lower-case name
    namespace: str = field(default_factory=lambda: f"cluster-{uuid.uuid4().hex[:8]}")
    children: list[Child] = field(default_factory=list)
    gateways: list[Child] = field(default_factory=list)
    workers: dict[str, list[Child]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
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
            VOICEPIPE_API_KEYS=ADMIN_KEY,
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
        child = self._spawn("gateway", ["gateway", "--port", str(port)], self.env(), port)
        self.gateways.append(child)
        return child

    def start_worker(self, stage: str) -> Child:
        extra = {"null_mode": "true"} if stage != "llm" else {}  # the orchestrator talks to the fake LLM
        child = self._spawn(stage, ["worker", stage], self.env(**extra))
        self.workers[stage].append(child)
        return child

    def ws_url(self, index: int) -> str:
        """The client WebSocket of the `index`-th gateway started."""
        return self.gateways[index].ws_url

    def http_url(self, index: int) -> str:
        return self.gateways[index].http_url

    async def readyz(self, index: int) -> tuple[int, dict]:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(f"{self.http_url(index)}/readyz")
            return answer.status_code, answer.json()

    async def wait_workers(self, counts: dict[str, int], timeout: float = 60) -> None:
        """Until every gateway's /readyz reports exactly these live workers per stage."""
        async with asyncio.timeout(timeout):
            for index, gateway in enumerate(self.gateways):
                while True:
                    assert gateway.alive(), gateway.log()[-3000:]
                    try:
                        _, body = await self.readyz(index)
                        if all(body.get("workers", {}).get(stage) == n for stage, n in counts.items()):
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)

    async def admin(self, index: int, path: str) -> dict:
        async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": ADMIN_KEY}) as client:
            answer = await client.get(f"{self.http_url(index)}{path}")
            answer.raise_for_status()
            return answer.json()

    async def routes(self, conversation_ids: list[str]) -> dict[str, dict[str, str]]:
        """Each conversation's lease as Redis holds it (empty when gone)."""
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            found = {}
            for cid in conversation_ids:
                raw = await client.hgetall(self.names.conversation(cid))
                found[cid] = {k.decode(): v.decode() for k, v in raw.items()}
            return found
        finally:
            await client.aclose()

    async def live_worker_ids(self) -> dict[str, set[str]]:
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            found: dict[str, set[str]] = {}
            for stage in STAGES:
                ids = [wid.decode() for wid in await client.zrange(self.names.workers(stage), 0, -1)]
                found[stage] = {wid for wid in ids if await client.exists(self.names.worker(stage, wid))}
            return found
        finally:
            await client.aclose()

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

    def stop(self) -> None:
        """SIGTERM every process still running, gateways first, and wait for each to exit."""
        for child in [*self.gateways, *(c for c in self.children if c not in self.gateways)]:
            child.stop()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.log_dir.glob("*.log")))

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
