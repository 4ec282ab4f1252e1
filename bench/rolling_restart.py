"""Rolling restarts and gateway failover under steady traffic, every process real.

    python -m bench.rolling_restart [--clients 8] [--rounds 3] [--part both|rolling|failover]

Two gateways and two replicas of each stage run as child processes on one Redis (the test Redis:
VOICEPIPE_TEST_REDIS_URL, else 127.0.0.1:6379, else an embedded one), VAD/STT and TTS with null
models and the orchestrators on a fake echoing OpenAI-compatible LLM (tests/support/cluster.py).
Clients, half on each gateway, type a turn as soon as the previous one is done.

1. Rolling restart: every replica of every stage in turn gets SIGTERM; once it has exited a fresh
   one is started and its heartbeat awaited before the next. Prints the turns served and failed
   meanwhile (a failed turn: an `error`, no `response.done` within 30 s, or a reply that lost the
   conversation's history) and each replica's SIGTERM -> exit time.
2. Gateway failover, `--rounds` times: the clients of one gateway each finish a turn, that gateway
   gets SIGKILL, and each client at once resumes its conversation on the other gateway with its
   `resume_token` and types the next turn. Prints SIGKILL -> `session.started` (resumed) and
   SIGKILL -> that next turn's `response.done`, in ms. A new gateway replaces the killed one."""
from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from bench.stack import percentile
from tests.support.cluster import STAGES, Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.redis_server import TestRedis
from tests.support.traffic import Talker


def served(talkers: list[Talker]) -> tuple[int, int]:
    return sum(t.turns_done for t in talkers), sum(len(t.failures) for t in talkers)


async def rolling_restart(cluster: Cluster, client, talkers: list[Talker], replicas: dict[str, list]) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(t.talk_until(stop)) for t in talkers]
    done_before, failed_before = served(talkers)
    started = time.monotonic()
    exits: list[tuple[str, float, int, str]] = []
    for stage in STAGES:
        for old in list(replicas[stage]):
            signalled = time.monotonic()
            old.signal(signal.SIGTERM)
            code = await old.wait_exit(60)
            exit_ms = (time.monotonic() - signalled) * 1000
            line = next((l for l in old.log().splitlines() if "Shutdown cleanup completed" in l), "")
            handed = line.rsplit("handed_off=", 1)[1] if "handed_off=" in line else "?"
            exits.append((stage, exit_ms, code, handed))
            fresh = cluster.start_worker(stage)
            await cluster.wait_heartbeat(client, stage, fresh)
            replicas[stage] = [c for c in replicas[stage] if c is not old] + [fresh]
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*tasks)
    done_after, failed_after = served(talkers)
    print(f"rolling restart of {len(exits)} replicas in {elapsed:.1f} s, {len(talkers)} clients typing without pause:")
    print(f"  turns served: {done_after - done_before}, turns failed: {failed_after - failed_before}")
    for stage, exit_ms, code, handed in exits:
        print(f"  {stage:8s} SIGTERM -> exit {code}: {exit_ms:6.0f} ms, conversations handed off: {handed}")
    for talker in talkers:
        for failure in talker.failures:
            print(f"  failed: conversation {failure.conversation} turn {failure.turn}: {failure.why}")


async def failover(cluster: Cluster, talkers: list[Talker], gateways: list, rounds: int) -> None:
    resumed_ms: list[float] = []
    answered_ms: list[float] = []
    failed = 0
    for _ in range(rounds):
        victim, survivor = gateways
        movers = [t for t in talkers if t.url == victim.ws_url]
        for talker in movers:
            await talker.turn()
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)

        async def move(talker: Talker, survivor=survivor, killed=killed) -> bool:
            await talker.resume_on(survivor.ws_url)
            resumed_ms.append((time.monotonic() - killed) * 1000)
            talker.url = survivor.ws_url
            if await talker.turn() is None:
                return False
            answered_ms.append((time.monotonic() - killed) * 1000)
            return True

        failed += sum(not ok for ok in await asyncio.gather(*(move(t) for t in movers)))
        await victim.wait_exit(10)
        replacement = cluster.start_gateway()
        await cluster.wait_ready(replacement)
        gateways[:] = [survivor, replacement]
    n = len(resumed_ms)
    print(f"gateway SIGKILL -> resumed on the other gateway ({n} resumes over {rounds} kills):")
    print(f"  resumed (session.started): p50 {percentile(resumed_ms, 50):.0f} ms, max {max(resumed_ms):.0f} ms")
    if answered_ms:
        print(f"  next turn answered (response.done): p50 {percentile(answered_ms, 50):.0f} ms, max {max(answered_ms):.0f} ms")
    print(f"  next turns failed: {failed}")


async def main(clients: int, rounds: int, part: str) -> None:
    redis_server = TestRedis()
    client = aioredis.Redis.from_url(redis_server.url)
    log_dir = Path(tempfile.mkdtemp(prefix="voicepipe-bench-rolling-"))
    print(f"# logs in {log_dir}", flush=True)
    with FakeLlmServer(FakeLlm(echo=True)) as llm:
        cluster = Cluster(redis_server.url, llm.base_url, log_dir, settings={"history_max_messages": "100000", "history_max_chars": "10000000"})
        talkers: list[Talker] = []
        try:
            gateways = [cluster.start_gateway(), cluster.start_gateway()]
            replicas = {stage: [cluster.start_worker(stage) for _ in range(2)] for stage in STAGES}
            for stage, children in replicas.items():
                for child in children:
                    await cluster.wait_heartbeat(client, stage, child)
            for gateway in gateways:
                await cluster.wait_ready(gateway)
            talkers = [Talker(i, gateways[i % 2].ws_url) for i in range(clients)]
            for talker in talkers:
                await talker.connect()
                await talker.turn()
            if part in ("both", "rolling"):
                await rolling_restart(cluster, client, talkers, replicas)
            if part in ("both", "failover"):
                await failover(cluster, talkers, gateways, rounds)
        finally:
            for talker in talkers:
                await talker.aclose()
            cluster.stop_all()
            await cluster.delete_keys(client)
            await client.aclose()
            redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=("both", "rolling", "failover"), default="both")
    args = parser.parse_args()
    asyncio.run(main(args.clients, args.rounds, args.part))
