"""Scaling out: spoken conversations per second served with 1 and with 2 processes per stage.

    python -m bench.scaling [--compute-ms 150] [--clients 32] [--seconds 40]
    python -m bench.scaling --real [--clients 4] [--seconds 90]   # the shipped models, for reference

Each run starts its own processes as compose does (an embedded redis-server, one gateway, K
`voicepipe worker` processes of each stage) and `--clients` clients that each hold a conversation
open a conversation, speak a recorded question (q1.wav, 1.8 s, real-time pace, `input_audio.commit`
at its end), wait for `response.done`, close, and start the next, for `--seconds`. A conversation
served is one such turn through all three stages; one that ends with an `error` or no reply, or
that times out, is counted as failed.

The default engines are null models with a fixed compute time per request (`NULL_MODE`,
`NULL_COMPUTE_MS`, workers/null.py): transcription, the LLM request and each synthesized piece
take `--compute-ms` each, one at a time per process, as a loaded model serves them. The time is a
wait, not busy CPU: it models engines on their own hardware, so the figure is how evenly the
pipeline spreads conversations over processes, which is what scaling out can give, and not the
benchmark machine's core count. Efficiency = (rate with 2 per stage / rate with 1) / 2; target
>= 0.8. With `--real` the shipped models run instead (whisper, the embedded SmolLM2 server, one
for all orchestrators, and piper), which on 2 cores can only show CPU contention."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import websockets

from bench.stack import percentile
from voicepipe.client import VoiceClient
from voicepipe.embedded import free_port, llm_argv, redis_argv
from voicepipe.wavio import read_audio_16k_mono

SPEECH = read_audio_16k_mono(Path(__file__).parent / "audio" / "q1.wav")
STAGES = ("vad_stt", "llm", "tts")


@contextlib.contextmanager
def processes(per_stage: int, env: dict[str, str], real: bool) -> Iterator[str]:
    """Redis, (the embedded LLM server with `real`), `per_stage` workers of each stage and one
    gateway, as child processes; yields the gateway's URL once /readyz says every stage is there."""
    logs = Path(tempfile.mkdtemp(prefix="voicepipe-scaling-"))
    children: list[tuple[str, subprocess.Popen]] = []
    redis_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")} | env
    env["VOICEPIPE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"

    def start(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            children.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)))

    def wait(url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, child in children:
                if child.poll() is not None:
                    raise RuntimeError(f"{name} exited with {child.returncode}; see {logs}/{name}.log")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s; logs in {logs}")
            time.sleep(0.3)

    try:
        start("redis", redis_argv(redis_port, str(logs)))
        if real:
            llm_port = free_port()
            start("llm-server", llm_argv(llm_port))
            env["VOICEPIPE_LLM_BASE_URL"] = f"http://127.0.0.1:{llm_port}/v1"
            wait(f"{env['VOICEPIPE_LLM_BASE_URL']}/models", "the LLM server", 180)
        for stage in STAGES:
            for i in range(per_stage):
                start(f"{stage}-{i}", [sys.executable, "-m", "voicepipe", "worker", stage])
        start("gateway", [sys.executable, "-m", "voicepipe", "gateway", "--port", str(http_port)])
        url = f"http://127.0.0.1:{http_port}"
        wait(f"{url}/readyz", "the pipeline", 300)
        deadline = time.monotonic() + 60  # every worker announced, not only one of each stage
        while httpx.get(f"{url}/readyz", timeout=2).json().get("workers") != {s: per_stage for s in STAGES}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every worker announced itself; logs in {logs}")
            time.sleep(0.3)
        yield url
    finally:
        for _, child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _, child in reversed(children):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


class Tally:
    def __init__(self) -> None:
        self.served = 0
        self.failed: Counter[str] = Counter()
        self.turn_s: list[float] = []


async def speaker(ws_url: str, tally: Tally, stop_at: float, measure_from: float) -> None:
    """Conversation after conversation (connect, one spoken turn, close) until `stop_at`; counts
    those that end after `measure_from`. Every conversation is routed anew, as new users are."""
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            async with VoiceClient(ws_url) as client:
                await client.send_speech(SPEECH, realtime=True, trailing_silence_s=0)
                await client.send_json({"type": "input_audio.commit"})
                turn = await client.receive_turn(timeout=120)
        except (TimeoutError, OSError, websockets.WebSocketException) as exc:
            tally.failed[type(exc).__name__] += 1
            continue
        ended = time.monotonic()
        if ended < measure_from or ended > stop_at:
            continue
        if turn.errors:
            tally.failed.update(e.get("code", "?") for e in turn.errors)
        elif turn.done is None or not turn.done.get("text"):
            tally.failed["no reply"] += 1
        else:
            tally.served += 1
            tally.turn_s.append(ended - started)


async def measure(url: str, clients: int, seconds: float) -> tuple[Tally, float]:
    ws_url = url.replace("http", "ws", 1) + "/v1/ws"
    tally = Tally()
    warmup = 5.0  # every client connected and in its loop before counting starts
    now = time.monotonic()
    measure_from, stop_at = now + warmup, now + warmup + seconds
    tasks = []
    for _ in range(clients):
        tasks.append(asyncio.create_task(speaker(ws_url, tally, stop_at, measure_from)))
        await asyncio.sleep(min(0.1, warmup / clients))  # staggered: not every question on the same frame
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            tally.failed[type(result).__name__] += 1
    return tally, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compute-ms", type=float, default=150, help="null engines' compute time per request")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--real", action="store_true", help="the shipped models instead of null engines")
    args = parser.parse_args()
    env = {"VOICEPIPE_LOG_LEVEL": "WARNING", "VOICEPIPE_MAX_CONNECTIONS_PER_CLIENT": "0"}
    if not args.real:
        env |= {"VOICEPIPE_NULL_MODE": "true", "VOICEPIPE_NULL_COMPUTE_MS": str(args.compute_ms),
                "VOICEPIPE_LLM_BASE_URL": "http://127.0.0.1:9/v1"}  # never called in null mode
    engines = "shipped models" if args.real else f"null engines, {args.compute_ms:.0f} ms per request"
    print(f"# {args.clients} clients speaking q1.wav in a loop for {args.seconds:.0f} s; {engines}", flush=True)
    rates = {}
    for per_stage in (1, 2):
        with processes(per_stage, env, args.real) as url:
            tally, seconds = asyncio.run(measure(url, args.clients, args.seconds))
        rates[per_stage] = tally.served / seconds
        print(
            f"{per_stage} process(es) per stage: {rates[per_stage]:5.2f} conversations/s "
            f"({tally.served} served, failed {dict(tally.failed) or 0}); turn time p50 "
            f"{percentile(tally.turn_s, 50):.2f} s p95 {percentile(tally.turn_s, 95):.2f} s",
            flush=True,
        )
    efficiency = rates[2] / rates[1] / 2 if rates[1] else float("nan")
    print(f"\nspeed-up {rates[2] / rates[1]:.2f}x with 2 per stage; efficiency {efficiency:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
