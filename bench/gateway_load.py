"""Gateway capacity: how many real-time audio streams one gateway process carries.

    python -m bench.gateway_load [--clients 50,100,200,300] [--seconds 20]

For each count N, a fresh `voicepipe up` (embedded Redis) runs with every worker in null mode
(`NULL_MODE`: the real VAD, but instant fixed transcripts, replies and silent reply audio), and N
clients each stream a spoken question and 1.5 s of silence, over and over, in 20 ms frames at
real-time pace, reading everything the gateway sends back (a reply of about 3 s of audio a turn).
Reported per N, from the gateway's own clock (`/admin/resources/stats` `latency`):
- frame received -> published on the bus (`audio_in`), and bus message read -> written to the
  client's socket (`to_client`), p50 and p99;
- the gateway process's CPU per stream, and turns completed.
The largest N whose added latency stays at p99 <= 10 ms both ways is the capacity figure. The
clients run in this process, on the same two cores, so the figure is a lower bound."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import psutil

from bench.stack import running_stack
from voicepipe.client import FRAME_BYTES, VoiceClient
from voicepipe.wavio import read_wav_16k_mono

API_KEY = "bench-admin-key"
SPEECH = read_wav_16k_mono(Path(__file__).parent / "audio" / "q1.wav")
LOOP = SPEECH + bytes(-len(SPEECH) % FRAME_BYTES) + bytes(48000)  # the question, then 1.5 s of silence


class Load:
    def __init__(self) -> None:
        self.turns = 0
        self.audio_bytes = 0
        self.errors: dict[str, int] = {}
        self.late_frames = 0  # frames sent more than 20 ms behind their real-time slot (the client lagging)


async def one_client(ws_url: str, load: Load, stop_at: float, offset: int) -> None:
    async with VoiceClient(ws_url) as client:

        async def read() -> None:
            async for frame in client.ws:
                if isinstance(frame, bytes):
                    load.audio_bytes += len(frame)
                    continue
                event = json.loads(frame)
                if event["type"] == "response.done":
                    load.turns += 1
                elif event["type"] == "error":
                    load.errors[event["code"]] = load.errors.get(event["code"], 0) + 1

        reader = asyncio.create_task(read())
        try:
            start, position = time.monotonic(), offset  # clients start at different points of the loop
            sent = 0
            while time.monotonic() < stop_at:
                await client.ws.send(LOOP[position : position + FRAME_BYTES])
                position = (position + FRAME_BYTES) % len(LOOP)
                sent += 1
                ahead = start + sent * 0.02 - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif ahead < -0.02:
                    load.late_frames += 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def gateway_process(up_pid: int) -> psutil.Process:
    for child in psutil.Process(up_pid).children(recursive=True):
        if "gateway" in " ".join(child.cmdline()):
            return child
    raise RuntimeError("no gateway process under voicepipe up")


async def run_step(http_url: str, up_pid: int, clients: int, seconds: float) -> dict:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    load = Load()
    gateway = gateway_process(up_pid)
    stop_at = time.monotonic() + seconds + 2
    tasks = [
        asyncio.create_task(one_client(ws_url, load, stop_at, (i * 7 * FRAME_BYTES) % len(LOOP)))
        for i in range(clients)
    ]
    await asyncio.sleep(2)  # every client connected and streaming
    cpu_before, wall_before = sum(gateway.cpu_times()[:2]), time.monotonic()
    async with httpx.AsyncClient(base_url=http_url, headers={"X-API-Key": API_KEY}) as admin:
        await admin.post("/admin/resources/latency/reset")
        await asyncio.sleep(seconds)
        latency = (await admin.get("/admin/resources/stats")).json()["latency"]
    cpu = sum(gateway.cpu_times()[:2]) - cpu_before
    wall = time.monotonic() - wall_before
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "clients": clients,
        "latency": latency,
        "gateway_cpu_per_stream_pct": 100 * cpu / wall / clients,
        "gateway_cpu_pct": 100 * cpu / wall,
        "turns": load.turns,
        "errors": load.errors,
        "late_frames": load.late_frames,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,100,200,300")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    env = {
        "VOICEPIPE_NULL_MODE": "true",
        "VOICEPIPE_LLM_BASE_URL": "http://127.0.0.1:9/v1",  # never called in null mode
        "VOICEPIPE_API_KEYS": API_KEY,
        "VOICEPIPE_LOG_LEVEL": "WARNING",
        "VOICEPIPE_MAX_CONNECTIONS_PER_CLIENT": "0",
    }
    os.environ.pop("VOICEPIPE_REDIS_URL", None)
    results = []
    for clients in (int(n) for n in args.clients.split(",")):
        with running_stack(None, env, with_pid=True) as (http_url, pid):
            result = asyncio.run(run_step(http_url, pid, clients, args.seconds))
        results.append(result)
        lat = result["latency"]
        print(
            f"N={clients:4}  audio_in p50 {lat['audio_in']['p50_ms']:5.2f} p99 {lat['audio_in']['p99_ms']:6.2f} ms   "
            f"to_client p50 {lat['to_client']['p50_ms']:5.2f} p99 {lat['to_client']['p99_ms']:6.2f} ms   "
            f"gateway CPU {result['gateway_cpu_pct']:5.1f} % ({result['gateway_cpu_per_stream_pct']:.2f} %/stream)   "
            f"turns {result['turns']}   errors {result['errors'] or 'none'}   late client frames {result['late_frames']}",
            flush=True,
        )
    ok = [r["clients"] for r in results if max(r["latency"]["audio_in"]["p99_ms"], r["latency"]["to_client"]["p99_ms"]) <= 10]
    print(f"\nlargest N at p99 <= 10 ms added by the gateway: {max(ok) if ok else 'none of those tried'}")


if __name__ == "__main__":
    main()
