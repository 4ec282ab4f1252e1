"""Replicas as real processes: gateways and workers of each stage, each its own `python -m voicepipe`
child joined only by Redis, so a replica can be killed with SIGKILL for real.

VAD/STT and TTS run in null mode (no models to load: typed turns never need speech, and the null
voice answers at once); the orchestrators talk to a fake OpenAI-compatible server, so a reply takes
as long as the test wants it to. Used by tests/e2e/test_replicas.py and bench/replica_failure.py."""
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
import websockets

from shared.channels import STAGES, Names
from voicepipe.embedded import free_port

ADMIN_KEY = "replicas-" + uuid.uuid4().hex
TURN_ENDING_ERRORS = {"stage_failed", "stage_unavailable"}


class Child:
    """One `python -m voicepipe ...` process, its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "voicepipe", *argv], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


@dataclass
class Cluster:
    redis_url: str
    llm_base_url: str
    log_dir: Path
    namespace: str = field(default_factory=lambda: f"replicas-{uuid.uuid4().hex[:8]}")
    settings: dict[str, str] = field(default_factory=dict)
    gateways: list[tuple[int, Child]] = field(default_factory=list)
    workers: dict[str, list[Child]] = field(default_factory=lambda: {stage: [] for stage in STAGES})

    @property
    def names(self) -> Names:
        ns = self.namespace
        return Names(ns, f"{ns}:connection_events", f"{ns}:tts_control")

    def env(self, **extra: str) -> dict[str, str]:
        ns = self.namespace
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
        env.update(
            VOICEPIPE_REDIS_URL=self.redis_url,
            VOICEPIPE_NAMESPACE=ns,
            VOICEPIPE_CONNECTION_EVENTS_CHANNEL=f"{ns}:connection_events",
            VOICEPIPE_TTS_CONTROL_CHANNEL=f"{ns}:tts_control",
            VOICEPIPE_API_KEYS=ADMIN_KEY,
            VOICEPIPE_LLM_BASE_URL=self.llm_base_url,
            VOICEPIPE_WORKER_TTL_S="2",
            VOICEPIPE_HEARTBEAT_INTERVAL_S="0.5",
            VOICEPIPE_STALE_TIMEOUT_S="4",
            VOICEPIPE_HEALTH_LOG_INTERVAL_S="0",
            VOICEPIPE_MEMORY_TRIM_INTERVAL_S="0",
            PYTHONUNBUFFERED="1",
        )
        env.update({f"VOICEPIPE_{k.upper()}": v for k, v in self.settings.items()})
        env.update(extra)
        return env

    def start_worker(self, stage: str) -> Child:
        index = len(self.workers[stage])
        null = {"VOICEPIPE_NULL_MODE": "true"} if stage != "llm" else {}
        child = Child(["worker", stage], self.env(**null), self.log_dir / f"{stage}-{index}.log")
        self.workers[stage].append(child)
        return child

    def start_gateway(self) -> int:
        port = free_port()
        child = Child(["gateway", "--port", str(port)], self.env(), self.log_dir / f"gateway-{len(self.gateways)}.log")
        self.gateways.append((port, child))
        return port

    def ws_url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.gateways[index][0]}/v1/ws"

    def http_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.gateways[index][0]}"

    async def readyz(self, index: int) -> tuple[int, dict]:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(f"{self.http_url(index)}/readyz")
            return answer.status_code, answer.json()

    async def wait_workers(self, counts: dict[str, int], timeout: float = 60) -> None:
        """Until every gateway's /readyz reports exactly these live workers per stage."""
        async with asyncio.timeout(timeout):
            for index, (_, child) in enumerate(self.gateways):
                while True:
                    assert child.process.poll() is None, child.log_path.read_text()[-3000:]
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

    def stop(self) -> None:
        for _, child in self.gateways:
            child.stop()
        for children in self.workers.values():
            for child in children:
                child.stop()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.log_dir.glob("*.log")))


@dataclass
class TurnResult:
    turn_id: str | None = None
    errors: list[str] = field(default_factory=list)
    done: dict | None = None
    deltas: int = 0
    events: list[str] = field(default_factory=list)  # every event's type, in order (binary frames: "audio")
    sent_at: float = 0.0
    ended_at: float = 0.0


class Hung(AssertionError):
    """A turn that did not end: the conversation, and the events that did arrive."""


class Conversation:
    """One client socket, raw frames, and the events of its turns."""

    def __init__(self, ws, started: dict) -> None:
        self.ws = ws
        self.id = started["conversation_id"]

    @classmethod
    async def open(cls, url: str) -> "Conversation":
        ws = await websockets.connect(url, max_size=None, open_timeout=30)
        started = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert started["type"] == "session.started", started
        return cls(ws, started)

    async def send_text(self, text: str) -> float:
        await self.ws.send(json.dumps({"type": "text.input", "text": text}))
        return time.monotonic()

    async def receive_turn(self, result: TurnResult, first_delta: asyncio.Event | None = None) -> TurnResult:
        """Events until the turn's `response.done` (the caller bounds the wait)."""
        while True:
            frame = await self.ws.recv()
            if isinstance(frame, bytes):
                if result.events[-1:] != ["audio"]:
                    result.events.append("audio")
                continue
            event = json.loads(frame)
            kind = event["type"]
            result.events.append(kind)
            if kind == "error":
                result.errors.append(event["code"])
                result.turn_id = result.turn_id or event.get("turn_id")
            elif kind == "response.text.delta":
                result.deltas += 1
                result.turn_id = result.turn_id or event["turn_id"]
                if first_delta is not None:
                    first_delta.set()
            elif kind == "response.done":
                result.done, result.turn_id, result.ended_at = event, event["turn_id"], time.monotonic()
                return result

    async def turn(self, text: str, timeout: float, first_delta: asyncio.Event | None = None) -> TurnResult:
        """One typed turn; a turn that does not end within `timeout` raises `Hung` with what arrived."""
        result = TurnResult()
        result.sent_at = await self.send_text(text)
        try:
            async with asyncio.timeout(timeout):
                return await self.receive_turn(result, first_delta)
        except TimeoutError:
            raise Hung(self.id, result.events) from None

    async def close(self) -> None:
        await self.ws.close()
