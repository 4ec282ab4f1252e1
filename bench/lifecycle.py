"""Lifecycle benchmarks: how fast every worker lets go of a conversation, how fast the upstream LLM
stream closes, and whether 10,000 connect/speak/disconnect cycles leave anything behind.

    python -m bench.lifecycle [--conversations 200] [--cycles 10000]

Starts its own `voicepipe up` (embedded Redis) with a fake OpenAI-compatible LLM server in this
process, so stream closes are seen on the same clock as socket closes."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

import httpx
import psutil
import redis.asyncio as aioredis
import websockets

from bench.stack import percentile, running_stack
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.client import VoiceClient
from voicepipe.wavio import read_audio_16k_mono

API_KEY = "bench-admin-key"
TRIM_INTERVAL_S = 2.0  # processes return freed heap this often after conversations end
SPEECH = read_audio_16k_mono(Path(__file__).parent / "audio" / "q1.wav")


class Bench:
    def __init__(self, http_url: str, llm: FakeLlm) -> None:
        self.http_url = http_url
        self.ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
        self.admin = httpx.AsyncClient(base_url=http_url, headers={"X-API-Key": API_KEY}, timeout=10)
        self.llm = llm

    async def close_to_clean(self, n: int, redis_url: str) -> dict[str, list[float]]:
        """Socket close -> each worker done cleaning (the workers' own completion times), and the
        gateway's share: socket close -> `connection_disconnected` stamped (its `timestamp_ms`)."""
        per_stage: dict[str, list[float]] = {"event": [], "vad_stt": [], "llm": [], "tts": [], "all": []}
        self.llm.token_delay_s = 0.02
        events = aioredis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        await events.subscribe("connection_events")
        stamped: dict[str, float] = {}
        for _ in range(n):
            client = await VoiceClient(self.ws_url).open()
            cid = client.conversation_id
            await client.send_speech(SPEECH[:6400], realtime=False, trailing_silence_s=0)
            await client.say("Hello there.")
            await client.collect_until("response.audio.started")
            closed_ms = time.time_ns() / 1e6
            await client.ws.close()
            cleaned = await self._cleaned(cid)
            while cid not in stamped:
                raw = await events.get_message(timeout=5)
                if raw is not None:
                    event = json.loads(raw["data"])
                    stamped[event["conversation_id"]] = event["timestamp_ms"]
            per_stage["event"].append(stamped.pop(cid) - closed_ms)
            for stage, at in cleaned.items():
                per_stage[stage].append(at - closed_ms)
            per_stage["all"].append(max(cleaned.values()) - closed_ms)
        await events.aclose()
        return per_stage

    async def _cleaned(self, cid: str) -> dict[str, float]:
        async with asyncio.timeout(10):
            while True:
                state = (await self.admin.get(f"/admin/conversations/{cid}")).json()
                done = {w["stage"]: w["cleaned_ms"] for w in state["workers"] if w.get("cleaned_ms")}
                if len(done) == 3:
                    return done
                await asyncio.sleep(0.02)

    async def upstream_close(self, n: int) -> list[float]:
        """Socket close -> the LLM server sees its streaming request go away."""
        self.llm.token_delay_s = 0.05
        results = []
        for _ in range(n):
            client = await VoiceClient(self.ws_url).open()
            await client.say("Tell me a long story.")
            await client.collect_until("response.text.delta")
            record = self.llm.streams[-1]
            closed = time.monotonic()
            await client.ws.close()
            ended = await record.wait_ended(timeout=5, poll_s=0.001)
            assert not record.completed
            results.append((ended - closed) * 1000)
        return results

    async def churn(self, cycles: int, concurrency: int) -> None:
        self.llm.token_delay_s = 0.0
        self.llm.reply = "Okay."
        limit = asyncio.Semaphore(concurrency)

        async def cycle(i: int) -> None:
            async with limit:
                try:
                    client = await VoiceClient(self.ws_url).open()
                    await client.send_speech(SPEECH[: random.randrange(640, 16000, 640)], realtime=False, trailing_silence_s=0)
                    if i % 10 == 0:
                        await client.say("Hi.")
                        await asyncio.sleep(random.random() * 0.2)
                    if i % 2:
                        await client.ws.close()
                    else:
                        client.drop("drop")
                except (OSError, websockets.WebSocketException):
                    pass

        await asyncio.gather(*(cycle(i) for i in range(cycles)))

    async def settled_workers(self, timeout: float = 30) -> list[dict]:
        """Every worker's report once none holds a conversation (and every process has trimmed its heap)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = (await self.admin.get("/admin/workers")).json()["workers"]
            if all(w["conversations"] == 0 for w in workers) or time.monotonic() > deadline:
                await asyncio.sleep(TRIM_INTERVAL_S + 1)
                return workers


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        for name in ("gateway", "worker vad_stt", "worker llm", "worker tts"):
            if cmd.endswith(name) or f" {name} " in f"{cmd} ":
                out[name.replace("worker ", "")] = child.memory_info().rss / 2**20
    return out


async def run(args: argparse.Namespace, http_url: str, llm: FakeLlm, up_pid: int) -> None:
    bench = Bench(http_url, llm)
    redis_url = (await bench.admin.get("/admin/resources/pools")).json()["redis"]["url"]
    client = aioredis.Redis.from_url(redis_url)

    clean = await bench.close_to_clean(args.conversations, redis_url)
    print(f"\nsocket close -> worker done cleaning, {args.conversations} conversations (ms)")
    for stage, values in clean.items():
        print(f"  {stage:8} p50 {percentile(values, 50):6.2f}   p99 {percentile(values, 99):6.2f}   max {max(values):6.2f}")

    upstream = await bench.upstream_close(args.streams)
    print(f"\nsocket close -> upstream LLM stream closed, {args.streams} streams (ms)")
    print(f"  p50 {percentile(upstream, 50):6.2f}   p99 {percentile(upstream, 99):6.2f}   max {max(upstream):6.2f}")

    warm = max(1, args.cycles // 10)
    await bench.churn(warm, args.concurrency)
    await bench.settled_workers()
    before = rss_mb(up_pid)
    started = time.monotonic()
    await bench.churn(args.cycles // 2, args.concurrency)
    await bench.settled_workers()
    middle = rss_mb(up_pid)
    await bench.churn(args.cycles - args.cycles // 2, args.concurrency)
    elapsed = time.monotonic() - started
    workers = await bench.settled_workers()
    after = rss_mb(up_pid)
    keys = [k.decode() async for k in client.scan_iter(match="vp:*", count=1000)]
    kinds = {"history": 0, "worker heartbeat": 0, "other": []}
    for key in keys:
        if key.endswith(":history"):
            kinds["history"] += 1
        elif key.startswith(("vp:worker:", "vp:workers:")):
            kinds["worker heartbeat"] += 1
        else:
            kinds["other"].append(key)
    print(f"\nchurn: {args.cycles} connect/speak/disconnect cycles in {elapsed:.1f} s ({args.cycles / elapsed:.0f}/s), after {warm} warm-up cycles")
    held = ", ".join(f"{w['stage']}={w['conversations']}" for w in workers)
    print(f"  conversations held afterwards: {held}")
    print(f"  Redis keys afterwards: {kinds['history']} histories, {kinds['worker heartbeat']} heartbeat keys, residual: {kinds['other'] or 'none'}")
    print("  RSS per process: after warm-up -> after half the cycles -> after all (growth over the second half)")
    for name in sorted(before):
        mid, end = middle.get(name, 0), after.get(name, 0)
        print(f"  RSS {name:8} {before[name]:7.1f} MB -> {mid:7.1f} MB -> {end:7.1f} MB ({end - mid:+.1f} MB)")
    await client.aclose()
    await bench.admin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    with FakeLlmServer(FakeLlm()) as llm:
        env = {
            "VOICEPIPE_LLM_BASE_URL": llm.base_url,
            "VOICEPIPE_API_KEYS": API_KEY,
            "VOICEPIPE_LOG_LEVEL": "WARNING",
            "VOICEPIPE_NAMESPACE": "vp",
            "VOICEPIPE_RESUME_WINDOW_S": "600",
            "VOICEPIPE_MEMORY_TRIM_INTERVAL_S": str(TRIM_INTERVAL_S),
        }
        os.environ.pop("VOICEPIPE_REDIS_URL", None)
        with running_stack(None, env, with_pid=True) as (http_url, pid):
            asyncio.run(run(args, http_url, llm, pid))


if __name__ == "__main__":
    main()
