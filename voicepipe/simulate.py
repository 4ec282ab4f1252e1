"""`voicepipe simulate-disconnects`: prove that nothing outlives a dead conversation.

Real WebSocket clients speak a real question and drop at each phase of the turn (listening,
transcribing, generating, speaking) in each way (clean close, abrupt TCP drop, going silent so only
the server's ping timeout notices). For every one it asks `/admin/conversations/{id}` until every
worker holds nothing and Redis holds only the history, and a bus watcher counts orphan messages:
anything published for the conversation after its cleanup was seen complete. Prints a table and
exits non-zero on any leak or orphan. `--churn N` runs N fast connect/speak/disconnect cycles and
then checks that every worker is back to holding nothing."""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis
import websockets

from shared.channels import Names
from shared.config import Settings
from shared.logging import MASK
from shared.messages.codec import DecodeError, decode
from shared.percentiles import percentile
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

PHASES = ("listening", "transcribing", "generating", "speaking")
WAYS = ("close", "drop", "silent")
PHASE_TRIGGERS = {
    "listening": "speech.started",
    "transcribing": "speech.stopped",
    "generating": "response.text.delta",
    "speaking": "response.audio.started",
}
SPEECH = Path(__file__).parent / "data" / "question.wav"
ORPHAN_GRACE_S = 0.05  # a message already in flight when cleanup completed is not an orphan


@dataclass
class Outcome:
    phase: str
    way: str
    conversation_id: str = ""
    cleanup_ms: float | None = None
    leak: str | None = None
    reached_phase: bool = True
    clean_at: float | None = None  # monotonic time cleanup was seen complete
    orphans: list[str] = field(default_factory=list)


async def run_until(client: VoiceClient, pcm: bytes, trigger: str, timeout: float = 60.0, realtime: bool = True) -> bool:
    """Speak (at real-time pace, as a microphone does, then silence) until the server sends
    `trigger`; returns False if the turn ended, or the server closed the socket, without it."""
    sender = asyncio.create_task(client.send_speech(pcm, realtime=realtime, trailing_silence_s=30), name="simulate:speech")
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = await client.next_event(timeout)
                if event["type"] == trigger:
                    return True
                if event["type"] == "response.done":
                    return False
    except websockets.ConnectionClosed:
        return False
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


class Admin:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"X-API-Key": api_key}, timeout=10)

    async def get(self, path: str) -> dict:
        response = await self.http.get(path)
        if response.status_code == 401:
            raise SystemExit("the gateway refused the admin key: pass --api-key or set VOICEPIPE_API_KEYS")
        response.raise_for_status()
        return response.json()

    async def residue(self, conversation_id: str, history_key: str) -> str | None:
        """What is still held for the conversation, or None when it is fully cleaned."""
        state = await self.get(f"/admin/conversations/{conversation_id}")
        problems = []
        if state["connected"]:
            problems.append("still connected")
        for worker in state["workers"]:
            if worker.get("responding") is False:
                problems.append(f"{worker['worker_id']} did not answer")
            held = {k: v for k, v in worker["holds"].items() if v}
            if held:
                problems.append(f"{worker['stage']} holds {held}")
        extra = [k for k in state["redis_keys"] if k != history_key]
        if extra:
            problems.append(f"redis keys {extra}")
        return "; ".join(problems) or None

    async def aclose(self) -> None:
        await self.http.aclose()


class BusWatcher:
    """Records every bus message by conversation, with its arrival time."""

    def __init__(self, client: aioredis.Redis, names: Names) -> None:
        self.client = client
        self.names = names
        self.seen: dict[str, list[tuple[float, str, str]]] = {}
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> "BusWatcher":
        self._task = asyncio.create_task(self._watch(), name="simulate:bus-watcher")
        async with asyncio.timeout(5):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(f"{self.names.namespace}:*")
            await pubsub.subscribe(self.names.connection_events, self.names.tts_control)
            self._ready.set()
            while True:
                raw = await pubsub.get_message(timeout=None)
                if raw is None:
                    continue
                try:
                    message = decode(raw["data"])
                except DecodeError:
                    continue
                channel = raw["channel"].decode()
                self.seen.setdefault(message.conversation_id, []).append((time.monotonic(), message.type, channel))
        finally:
            await pubsub.aclose()

    def orphans(self, conversation_id: str, clean_at: float) -> list[str]:
        return [
            f"{kind} on {channel}"
            for at, kind, channel in self.seen.get(conversation_id, [])
            if at > clean_at + ORPHAN_GRACE_S
        ]


class Simulation:
    def __init__(
        self, base_url: str, api_key: str, settings: Settings, pcm: bytes, cleanup_timeout: float, token: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_url = self.base_url.replace("http", "ws", 1) + "/v1/ws"
        self.token = token or None  # sent as Authorization: Bearer (docs/protocol.md §1: off the URL)
        self.admin = Admin(self.base_url, api_key)
        self.names = Names.from_settings(settings)
        self.pcm = pcm
        self.cleanup_timeout = cleanup_timeout

    async def one(self, phase: str, way: str) -> Outcome:
        outcome = Outcome(phase, way)
        client = VoiceClient(self.ws_url, headers={"X-Correlation-ID": f"sim-{uuid.uuid4()}"}, token=self.token)
        await client.open()
        try:
            outcome.conversation_id = client.conversation_id
            outcome.reached_phase = await run_until(client, self.pcm, PHASE_TRIGGERS[phase])
            dropped_at = time.monotonic()
            closing = client.drop(way)
            outcome.leak = await self._wait_clean(outcome.conversation_id)
            if outcome.leak is None:
                outcome.clean_at = time.monotonic()
                outcome.cleanup_ms = (outcome.clean_at - dropped_at) * 1000
            if closing is not None:
                closing.cancel()  # the server has cleaned up; the client's own close handshake does not matter
        finally:
            client.abort()
        return outcome

    async def _wait_clean(self, conversation_id: str) -> str | None:
        history = self.names.history(conversation_id)
        deadline = time.monotonic() + self.cleanup_timeout
        while True:
            residue = await self.admin.residue(conversation_id, history)
            if residue is None:
                return None
            if time.monotonic() > deadline:
                return residue
            await asyncio.sleep(0.005)

    async def churn_cycle(self) -> None:
        """Connect, speak (or type) a little, vanish at a random moment."""
        client = await VoiceClient(self.ws_url, token=self.token).open()
        try:
            if random.random() < 0.5:
                await client.say("Say something short.")
            await client.send_speech(self.pcm[: random.randrange(0, len(self.pcm))], realtime=False, trailing_silence_s=0)
            await asyncio.sleep(random.random() * 0.3)
        finally:
            if random.random() < 0.5:
                await client.ws.close()
            else:
                client.abort()

    async def workers_empty(self, timeout: float) -> list[str]:
        """Wait until no worker holds a conversation; returns what is still held at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            workers = (await self.admin.get("/admin/workers"))["workers"]
            busy = [f"{w['worker_id']}: {w['resources']}" for w in workers if w["conversations"] or not w["responding"]]
            if not busy or time.monotonic() > deadline:
                return busy


def report(outcomes: list[Outcome]) -> str:
    lines = [f"{'phase':13} {'way':7} {'count':>5} {'cleanup p50':>12} {'p99':>9} {'leaks':>6} {'orphans':>8}"]
    for phase in PHASES:
        for way in WAYS:
            group = [o for o in outcomes if o.phase == phase and o.way == way]
            if not group:
                continue
            times = [o.cleanup_ms for o in group if o.cleanup_ms is not None]
            p50, p99 = percentile(times, 50), percentile(times, 99)
            fmt = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
            lines.append(
                f"{phase:13} {way:7} {len(group):5} {fmt(p50):>12} {fmt(p99):>9} "
                f"{sum(o.leak is not None for o in group):6} {sum(len(o.orphans) for o in group):8}"
            )
    for o in outcomes:
        if o.leak:
            lines.append(f"LEAK {o.phase}/{o.way} {o.conversation_id}: {o.leak}")
        if o.orphans:
            lines.append(f"ORPHAN {o.phase}/{o.way} {o.conversation_id}: {', '.join(o.orphans)}")
        if not o.reached_phase:
            lines.append(f"note: {o.phase}/{o.way} {o.conversation_id}: the turn finished before that phase was seen")
    return "\n".join(lines)


async def simulate(args: argparse.Namespace, settings: Settings) -> int:
    base_url = args.url.rstrip("/")
    api_key = args.api_key or (settings.api_keys[0] if settings.api_keys else "")
    if not api_key:
        print("error: the admin API key is needed: pass --api-key or set VOICEPIPE_API_KEYS", file=sys.stderr)
        return 2
    pcm = read_audio_16k_mono(args.speech or SPEECH)
    token = args.token or (settings.client_tokens[0] if settings.client_tokens else None)
    sim = Simulation(base_url, api_key, settings, pcm, args.cleanup_timeout, token)
    try:
        redis_url = args.redis_url or settings.redis_url or (await sim.admin.get("/admin/resources/pools"))["redis"]["url"]
        if MASK in redis_url:  # the gateway never tells its Redis password
            print("error: the gateway's Redis needs a password: pass --redis-url or set VOICEPIPE_REDIS_URL", file=sys.stderr)
            return 2
        client = aioredis.Redis.from_url(redis_url)
        async with BusWatcher(client, sim.names) as watcher:
            if args.churn:
                return await _churn(sim, args)
            ways = [w for w in WAYS if w in args.ways.split(",")]
            phases = [p for p in PHASES if p in args.phases.split(",")]
            cases = [(p, w) for _ in range(args.repeat) for p in phases for w in ways]
            limit = asyncio.Semaphore(args.concurrency)

            async def guarded(phase: str, way: str) -> Outcome:
                async with limit:
                    return await sim.one(phase, way)

            outcomes = await asyncio.gather(*(guarded(p, w) for p, w in cases))
            await asyncio.sleep(args.settle)  # anything published late would arrive by now
            for o in outcomes:
                if o.clean_at is not None:
                    o.orphans = watcher.orphans(o.conversation_id, o.clean_at)
        await client.aclose()
    finally:
        await sim.admin.aclose()
    print(report(outcomes))
    failed = any(o.leak or o.orphans for o in outcomes)
    print("RESULT:", "FAIL" if failed else "OK", f"({len(outcomes)} disconnects)")
    return 1 if failed else 0


async def _churn(sim: Simulation, args: argparse.Namespace) -> int:
    started = time.monotonic()
    limit = asyncio.Semaphore(args.concurrency)

    async def cycle() -> None:
        async with limit:
            try:
                await sim.churn_cycle()
            except (OSError, websockets.WebSocketException, TimeoutError):
                pass  # a cycle that failed to connect still must not leak

    await asyncio.gather(*(cycle() for _ in range(args.churn)))
    busy = await sim.workers_empty(args.cleanup_timeout)
    elapsed = time.monotonic() - started
    print(f"churn: {args.churn} cycles in {elapsed:.1f} s ({args.churn / elapsed:.0f}/s)")
    for line in busy:
        print(f"LEAK {line}")
    print("RESULT:", "FAIL" if busy else "OK")
    return 1 if busy else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="admin key (default: first of VOICEPIPE_API_KEYS)")
    parser.add_argument("--token", default=None, help="client token, sent as Authorization: Bearer (default: first of VOICEPIPE_CLIENT_TOKENS)")
    parser.add_argument("--redis-url", default=None, help="the bus to watch (default: VOICEPIPE_REDIS_URL, else asked of the gateway)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--repeat", type=int, default=1, help="runs of every phase x way")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cleanup-timeout", type=float, default=60.0, help="seconds before a conversation counts as leaked")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to keep watching the bus for orphans")
    parser.add_argument("--speech", default=None, help="a WAV with a spoken question (default: a bundled one)")
    parser.add_argument("--churn", type=int, default=0, metavar="N", help="run N fast connect/speak/disconnect cycles instead")


def main(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(simulate(args, settings))
