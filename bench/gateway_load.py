"""Gateway capacity: how many real-time audio streams one gateway process carries.

    python -m bench.gateway_load [--clients 50,100,200,300] [--seconds 20] [--client-processes 2]
                                 [--pin gateway|gateway+redis] [--silence]

For each count N, a fresh `voicepipe up` (embedded Redis) runs with every worker in null mode
(`NULL_MODE`: the real VAD, but instant fixed transcripts, replies and silent reply audio), and N
clients each stream a spoken question and 1.5 s of silence, over and over, in 20 ms frames at
real-time pace, reading everything the gateway sends back (a reply of about 3 s of audio a turn).
Reported per N, from the gateway's own clock (`/admin/resources/stats` `latency`):
- frame received -> published on the bus (`audio_in`), and bus message read -> written to the
  client's socket (`to_client`), p50 and p99;
- the gateway process's CPU per stream and per client frame (its CPU time over the frames it
  published: this one does not move with how far behind real time the clients fell), and turns
  completed.
The largest N whose added latency stays at p99 <= 10 ms both ways is the capacity figure.

`--silence` streams digital silence instead: no turn ever starts, so only the uplink (socket ->
bus) is loaded, and CPU per frame compares code changes without the noise of how many turns a
loaded machine completed.

The clients run in `--client-processes` processes of their own (spawned, each an event loop with
N / processes sockets), so they never share the gateway's interpreter lock or this process's; a
client that falls more than 20 ms behind its real-time slot counts a "late frame" (the load
generator, not the gateway, lagging). `--pin gateway` puts the gateway process alone on the first CPU and
everything else (this process, the clients, Redis, the workers, `voicepipe up`) on the others, so
the gateway's figures are not the scheduler's: on a 2-core machine that is one core for the gateway
and one for the rest, which the output says. `--pin gateway+redis` puts Redis beside the gateway
(its round trips are part of `audio_in`; it needs a few % of a core), the rest on the others."""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import httpx
import psutil
import websockets

from bench.stack import running_stack
from voicepipe.client import FRAME_BYTES, SessionRefused, VoiceClient
from voicepipe.wavio import read_audio_16k_mono

API_KEY = "bench-admin-key"
SPEECH = read_audio_16k_mono(Path(__file__).parent / "audio" / "q1.wav")
LOOP = SPEECH + bytes(-len(SPEECH) % FRAME_BYTES) + bytes(48000)  # the question, then 1.5 s of silence
WARM_UP_S = 2.0  # every client connected and streaming before the gateway's figures are reset


class Load:
    def __init__(self) -> None:
        self.turns = 0
        self.audio_bytes = 0
        self.errors: dict[str, int] = {}
        self.late_frames = 0  # frames sent more than 20 ms behind their real-time slot (the client lagging)
        self.failed_clients = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


async def one_client(ws_url: str, load: Load, halt: asyncio.Event, offset: int, connected: asyncio.Event, audio: bytes) -> None:
    async with VoiceClient(ws_url, compression=None, ping_interval=None) as client:
        ws = client.ws
        connected.set()

        async def read() -> None:
            async for event in client.frames():
                if isinstance(event, bytes):
                    load.audio_bytes += len(event)
                    continue
                if event["type"] == "response.done":
                    load.turns += 1
                elif event["type"] == "error":
                    load.errors[event["code"]] = load.errors.get(event["code"], 0) + 1

        reader = asyncio.create_task(read())
        try:
            start, position = time.monotonic(), offset  # clients start at different points of the loop
            sent = 0
            while not halt.is_set():
                await ws.send(audio[position : position + FRAME_BYTES])
                position = (position + FRAME_BYTES) % len(audio)
                sent += 1
                ahead = start + sent * 0.02 - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                elif ahead < -0.02:
                    load.late_frames += 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def run_clients(ws_url: str, offsets: list[int], ready, stop, silence: bool) -> dict:
    load = Load()
    connected = [asyncio.Event() for _ in offsets]
    halt = asyncio.Event()

    async def guarded(offset: int, event: asyncio.Event) -> None:
        try:
            await one_client(ws_url, load, halt, offset, event, bytes(len(LOOP)) if silence else LOOP)
        except (OSError, websockets.WebSocketException, SessionRefused):
            load.failed_clients += 1
            event.set()

    tasks = [asyncio.create_task(guarded(offset, event)) for offset, event in zip(offsets, connected)]
    await asyncio.gather(*(event.wait() for event in connected))
    ready.set()
    while not stop.is_set():  # the benchmark's signal, polled here rather than by every client
        await asyncio.sleep(0.05)
    halt.set()
    await asyncio.gather(*tasks)
    return load.as_dict()


def client_process(ws_url: str, offsets: list[int], ready, stop, results, cpus: list[int] | None, silence: bool) -> None:
    """One process's share of the clients (the target of a spawned process)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results.put(asyncio.run(run_clients(ws_url, offsets, ready, stop, silence)))


def gateway_process(up_pid: int) -> psutil.Process:
    for child in psutil.Process(up_pid).children(recursive=True):
        if "gateway" in " ".join(child.cmdline()):
            return child
    raise RuntimeError("no gateway process under voicepipe up")


def role(process: psutil.Process, client_pids: set[int]) -> str:
    if process.pid in client_pids:
        return "clients"
    line = " ".join(process.cmdline())
    for name in ("redis-server", "vad_stt", "llm", "tts"):
        if name in line:
            return name.removesuffix("-server")
    return "voicepipe up"


def pin(up_pid: int, gateway: psutil.Process, with_redis: bool) -> tuple[list[int], list[int]]:
    """The gateway (and Redis, with `with_redis`) on the first CPU this process may use, everything
    else on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    mine, others = cpus[:1], cpus[1:]
    up = psutil.Process(up_pid)
    for process in [up, *up.children(recursive=True)]:
        first = process.pid == gateway.pid or (with_redis and role(process, set()) == "redis")
        process.cpu_affinity(mine if first else others)
    os.sched_setaffinity(0, others)
    return mine, others


async def run_step(
    http_url: str,
    up_pid: int,
    clients: int,
    seconds: float,
    processes: int,
    pinned: str | None,
    silence: bool = False,
) -> dict:
    ws_url = http_url.replace("http", "ws", 1) + "/v1/ws"
    gateway = gateway_process(up_pid)
    gateway_cpus = client_cpus = None
    if pinned:
        gateway_cpus, client_cpus = pin(up_pid, gateway, with_redis=pinned == "gateway+redis")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    offsets = [(i * 7 * FRAME_BYTES) % len(LOOP) for i in range(clients)]
    shares = [offsets[i::processes] for i in range(processes) if offsets[i::processes]]
    readies = [ctx.Event() for _ in shares]
    stop = ctx.Event()
    started = time.monotonic()
    workers = [
        ctx.Process(target=client_process, args=(ws_url, share, ready, stop, results, client_cpus, silence), daemon=True)
        for share, ready in zip(shares, readies)
    ]
    for worker in workers:
        worker.start()
    loop = asyncio.get_running_loop()
    for ready in readies:
        if not await loop.run_in_executor(None, ready.wait, 60):
            raise RuntimeError("clients did not connect within 60 s")
    connect_s = time.monotonic() - started
    await asyncio.sleep(WARM_UP_S)  # every client streaming
    tree = {p.pid: p for p in [psutil.Process(up_pid), *psutil.Process(up_pid).children(recursive=True)]}
    tree.update({w.pid: psutil.Process(w.pid) for w in workers})
    tree_before = {pid: sum(p.cpu_times()[:2]) for pid, p in tree.items()}
    cpu_before, wall_before = sum(gateway.cpu_times()[:2]), time.monotonic()
    async with httpx.AsyncClient(base_url=http_url, headers={"X-API-Key": API_KEY}, timeout=30) as admin:
        await admin.post("/admin/resources/latency/reset")
        await asyncio.sleep(seconds)
        latency = (await admin.get("/admin/resources/stats")).json()["latency"]
    cpu = sum(gateway.cpu_times()[:2]) - cpu_before
    wall = time.monotonic() - wall_before
    others: dict[str, float] = {}  # CPU % of every other process of the run, by what it is
    for pid, process in tree.items():
        if pid == gateway.pid:
            continue
        try:
            used = sum(process.cpu_times()[:2]) - tree_before[pid]
        except psutil.NoSuchProcess:
            continue
        name = role(process, {w.pid for w in workers})
        others[name] = others.get(name, 0.0) + 100 * used / wall
    stop.set()  # what the clients counted covers their whole run, warm-up included
    loads = [await loop.run_in_executor(None, results.get, True, 60) for _ in workers]
    for worker in workers:
        worker.join(10)
    total = Load()
    for load in loads:
        total.turns += load["turns"]
        total.late_frames += load["late_frames"]
        total.failed_clients += load["failed_clients"]
        for code, count in load["errors"].items():
            total.errors[code] = total.errors.get(code, 0) + count
    return {
        "clients": clients,
        "latency": latency,
        "gateway_cpu_per_stream_pct": 100 * cpu / wall / clients,
        "gateway_cpu_pct": 100 * cpu / wall,
        # per client frame published (audio_in count): what a stream costs, however far behind the clients fell
        "gateway_cpu_us_per_frame": 1e6 * cpu / max(1, latency["audio_in"].get("count", latency["audio_in"]["n"])),
        "frames_per_s": latency["audio_in"].get("count", latency["audio_in"]["n"]) / wall,
        "turns": total.turns,
        "errors": total.errors,
        "late_frames": total.late_frames,
        "failed_clients": total.failed_clients,
        "connect_s": connect_s,
        "others_cpu_pct": others,
        "pinned": {"gateway": gateway_cpus, "rest": client_cpus} if pinned else None,
    }


def ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,100,200,300")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--client-processes", type=int, default=2, help="processes the clients are spread over")
    parser.add_argument(
        "--pin", choices=["gateway", "gateway+redis"],
        help="the gateway (and Redis) on one CPU, everything else (clients, workers) on the others",
    )
    parser.add_argument("--silence", action="store_true", help="stream silence: no turns, only the audio uplink is measured")
    args = parser.parse_args()
    env = {
        "VOICEPIPE_NULL_MODE": "true",
        "VOICEPIPE_LLM_BASE_URL": "http://127.0.0.1:9/v1",  # never called in null mode
        "VOICEPIPE_API_KEYS": API_KEY,
        "VOICEPIPE_LOG_LEVEL": "WARNING",
        "VOICEPIPE_MAX_CONNECTIONS_PER_CLIENT": "0",
    }
    os.environ.pop("VOICEPIPE_REDIS_URL", None)
    print(f"# {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"clients in {args.client_processes} processes{f', {args.pin} pinned to one CPU' if args.pin else ''}", flush=True)
    results = []
    affinity = os.sched_getaffinity(0)
    for clients in (int(n) for n in args.clients.split(",")):
        with running_stack(None, env, with_pid=True) as (http_url, pid):
            result = asyncio.run(run_step(http_url, pid, clients, args.seconds, args.client_processes, args.pin, args.silence))
        os.sched_setaffinity(0, affinity)
        results.append(result)
        lat = result["latency"]
        print(
            f"N={clients:4}  audio_in p50 {ms(lat['audio_in']['p50_ms'])} p99 {ms(lat['audio_in']['p99_ms'])} ms   "
            f"to_client p50 {ms(lat['to_client']['p50_ms'])} p99 {ms(lat['to_client']['p99_ms'])} ms   "
            f"gateway CPU {result['gateway_cpu_pct']:5.1f} % ({result['gateway_cpu_per_stream_pct']:.2f} %/stream, "
            f"{result['gateway_cpu_us_per_frame']:.0f} us per frame, {result['frames_per_s']:.0f} frames/s)   "
            f"turns {result['turns']}   errors {result['errors'] or 'none'}   late client frames {result['late_frames']}"
            f"{'   clients that failed ' + str(result['failed_clients']) if result['failed_clients'] else ''}",
            flush=True,
        )
        print("        CPU of the rest: " + ", ".join(f"{k} {v:.0f} %" for k, v in sorted(result["others_cpu_pct"].items())), flush=True)
    ok = [r["clients"] for r in results if max(r["latency"]["audio_in"]["p99_ms"] or 0, r["latency"]["to_client"]["p99_ms"] or 0) <= 10]
    print(f"\nlargest N at p99 <= 10 ms added by the gateway: {max(ok) if ok else 'none of those tried'}")


if __name__ == "__main__":
    main()
