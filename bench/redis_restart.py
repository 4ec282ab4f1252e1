"""Redis restart benchmark: how soon a conversation is answered again after Redis comes back.

    python -m bench.redis_restart [--rounds 5] [--down 2.0]

Real processes: a redis-server of its own (nothing kept on disk), the gateway and one worker per
stage (`python -m voicepipe gateway|worker ...`), VAD/STT and TTS on the null models, the
orchestrator on a fake OpenAI-compatible LLM in this process. Each round: a reply is streaming on
an open conversation when Redis is killed (SIGKILL); Redis stays down `--down` seconds and is
started again on the same port. Figures per round:

- in-flight turn ended: SIGKILL -> that turn's `response.done` (it carries `error` `bus_unavailable`)
- first answered turn (same socket): Redis accepting connections again -> `response.done` of the
  first typed turn answered without error on the conversation opened before the restart (a turn
  answered with `bus_unavailable` is asked again at once, as a client would; they are counted)
- first answered turn (new socket): the same, at the same time, for a socket opened as soon as
  Redis is back (a 503 or `not_ready` is retried every 50 ms)
- process deaths, and hangs (a turn without `response.done` within 20 s)"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import websockets

from bench.stack import percentile
from shared.stages import STAGES
from tests.support.cluster import Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.redis_server import RedisProcess

HANG_S = 20.0
RETRY_S = 0.05


class Hang(Exception):
    pass


async def turn(ws, text: str) -> list[dict]:
    """Ask by text; every event up to `response.done` (raises Hang past HANG_S)."""
    await ws.send(json.dumps({"type": "text.input", "text": text}))
    events = []
    try:
        async with asyncio.timeout(HANG_S):
            while True:
                frame = await ws.recv()
                if isinstance(frame, str):
                    events.append(json.loads(frame))
                    if events[-1]["type"] == "response.done":
                        return events
    except TimeoutError:
        raise Hang(text) from None


def failed(events: list[dict]) -> bool:
    return any(e["type"] == "error" for e in events)


async def first_answer(ws, counts: Counter[str]) -> None:
    while failed(await turn(ws, "Are you there?")):
        counts["bus_unavailable_answers"] += 1


async def open_socket(url: str, counts: Counter[str]):
    """A socket that got `session.started`, retrying refusals (503 while Redis is down, not_ready)."""
    while True:
        try:
            ws = await websockets.connect(url, max_size=None)
        except websockets.InvalidStatus:
            counts["refused_503"] += 1
            await asyncio.sleep(RETRY_S)
            continue
        first = json.loads(await asyncio.wait_for(ws.recv(), HANG_S))
        if first["type"] == "session.started":
            return ws
        counts["refused_" + first.get("code", first["type"])] += 1
        await ws.close()
        await asyncio.sleep(RETRY_S)


async def run(rounds: int, down_s: float) -> int:
    redis = RedisProcess()
    workdir = Path(tempfile.mkdtemp(prefix="voicepipe-bench-redis-restart-"))
    llm = FakeLlm(reply=" ".join(f"word{i}." for i in range(40)))
    results: dict[str, list[float]] = {"in_flight_ended": [], "same_socket": [], "new_socket": []}
    counts: Counter[str] = Counter()
    deaths: list[str] = []
    with FakeLlmServer(llm):
        # the figures in docs/PERFORMANCE.md were taken with a heartbeat every second and the default TTL
        cluster = Cluster(redis.url, llm.base_url, workdir, settings={"heartbeat_interval_s": "1", "worker_ttl_s": "5"})
        try:
            for stage in STAGES:
                cluster.start_worker(stage)
            gateway = cluster.start_gateway()
            http_url, ws_url = gateway.http_url, gateway.ws_url
            async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(120):
                while True:
                    try:
                        if (await client.get(f"{http_url}/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            print(f"# stack up (logs in {workdir}); {rounds} restarts, Redis down {down_s:.1f} s each", flush=True)
            ws = await open_socket(ws_url, counts)
            for round_ in range(1, rounds + 1):
                try:
                    llm.token_delay_s = 0.1  # a reply of about 4 s: streaming when Redis is killed
                    await ws.send(json.dumps({"type": "text.input", "text": "Tell me a long story."}))
                    async with asyncio.timeout(HANG_S):
                        while not isinstance(frame := await ws.recv(), str) or json.loads(frame)["type"] != "response.text.delta":
                            pass
                    redis.kill()
                    killed = time.perf_counter()
                    async with asyncio.timeout(HANG_S):
                        while not isinstance(frame := await ws.recv(), str) or json.loads(frame)["type"] != "response.done":
                            pass
                    results["in_flight_ended"].append((time.perf_counter() - killed) * 1000)
                    llm.token_delay_s = 0.0
                    await asyncio.sleep(max(0.0, down_s - (time.perf_counter() - killed)))
                    redis.start()
                    back = time.perf_counter()

                    async def same_socket() -> None:
                        await first_answer(ws, counts)
                        results["same_socket"].append((time.perf_counter() - back) * 1000)

                    async def new_socket() -> None:
                        fresh = await open_socket(ws_url, counts)
                        await first_answer(fresh, counts)
                        results["new_socket"].append((time.perf_counter() - back) * 1000)
                        await fresh.close()

                    await asyncio.gather(same_socket(), new_socket())  # both at once, right after the restart
                except (Hang, TimeoutError):
                    counts["hangs"] += 1
                    print(f"round {round_}: HANG", flush=True)
                    if redis.process.poll() is not None:
                        redis.start()
                    await ws.close()
                    ws = await open_socket(ws_url, counts)
                    continue
                print(
                    f"round {round_}: in-flight turn ended {results['in_flight_ended'][-1]:.0f} ms after the kill; "
                    f"first answered turn {results['same_socket'][-1]:.0f} ms (same socket), "
                    f"{results['new_socket'][-1]:.0f} ms (new socket) after Redis was back",
                    flush=True,
                )
            await ws.close()
            deaths = [child.name for child in cluster.children if not child.alive()]
        finally:
            cluster.stop()
            redis.stop()
    print()
    print("| figure (ms) | p50 | max |")
    print("| --- | --- | --- |")
    labels = {
        "in_flight_ended": "Redis killed -> in-flight turn ended (`bus_unavailable`)",
        "same_socket": "Redis back -> first answered turn, same socket",
        "new_socket": "Redis back -> first answered turn, new socket",
    }
    for key, label in labels.items():
        values = results[key]
        print(f"| {label} | {percentile(values, 50):.0f} | {max(values, default=float('nan')):.0f} |")
    print()
    print(f"rounds: {rounds}; process deaths: {len(deaths)} {deaths or ''}; hangs: {counts['hangs']}; "
          f"turns answered bus_unavailable after the restart: {counts['bus_unavailable_answers']}; "
          f"sockets refused while settling: {sum(v for k, v in counts.items() if k.startswith('refused_'))}")
    return 1 if deaths or counts["hangs"] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--down", type=float, default=2.0, help="seconds Redis stays down each time")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.rounds, args.down)))


if __name__ == "__main__":
    main()
