"""Replica failure: one process of each stage killed with SIGKILL while conversations are replying;
how long until every affected conversation is re-routed, and how many turns were lost.

    python -m bench.replica_failure [--conversations 24] [--rounds 3]

Each round starts two gateways and two processes per stage as real processes (tests/support/
replicas.py: VAD/STT and TTS in null mode, the orchestrators on a fake OpenAI-compatible server in
this process), opens the conversations over both gateways, answers one turn in each, starts the
second turn in all of them, and once half are streaming kills the first process of each stage.
Re-routed: kill -> the conversation's lease names only live workers (polled every 20 ms). Turns
lost: second turns that ended with `stage_failed` (at most one per affected conversation is the
target); the third turn of every conversation must complete. Settings: WORKER_TTL_S 2,
STALE_TIMEOUT_S 4 (the target), heartbeats every 0.5 s."""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from shared.percentiles import percentile
from shared.stages import STAGES
from tests.support.cluster import Cluster
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from tests.support.redis_server import TestRedis
from tests.support.replicas import REPLICA_SETTINGS, Conversation

TURN_TIMEOUT_S = 30.0


def worker_id_of(ids: set[str], pid: int) -> str:
    """The id of the worker process `pid` (ids are stage-host-pid-suffix)."""
    return next(wid for wid in ids if f"-{pid}-" in wid)


async def one_round(cluster: Cluster, n: int) -> dict[str, object]:
    for stage in STAGES:
        cluster.start_worker(stage)
        cluster.start_worker(stage)
    cluster.start_gateway()
    cluster.start_gateway()
    await cluster.wait_workers({stage: 2 for stage in STAGES})
    conversations = [await Conversation.open(cluster.ws_url(i % 2)) for i in range(n)]
    ids = [c.id for c in conversations]
    try:
        await asyncio.gather(*(c.turn("What is the capital of France?", TURN_TIMEOUT_S) for c in conversations))
        before = await cluster.routes(ids)
        live = await cluster.live_worker_ids()
        victims = {stage: cluster.workers[stage][0] for stage in STAGES}
        dead = {worker_id_of(live[stage], child.process.pid) for stage, child in victims.items()}
        affected = {cid for cid, route in before.items() if any(route[s] in dead for s in STAGES)}
        replying = [asyncio.Event() for _ in conversations]
        second = [
            asyncio.create_task(c.turn("And of Italy?", TURN_TIMEOUT_S, first_delta=flag))
            for c, flag in zip(conversations, replying)
        ]
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while sum(flag.is_set() for flag in replying) < n // 2:
                await asyncio.sleep(0.005)
        killed_at = time.monotonic()
        for child in victims.values():
            child.kill()
        rerouted: dict[str, float] = {}
        async with asyncio.timeout(60):
            while len(rerouted) < len(affected):
                routes = await cluster.routes(sorted(affected - set(rerouted)))
                now = time.monotonic() - killed_at
                for cid, route in routes.items():
                    if route and not any(route[s] in dead for s in STAGES):
                        rerouted[cid] = now
                await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(*second)  # a hang raises TimeoutError
        third = await asyncio.gather(*(c.turn("And of Spain?", TURN_TIMEOUT_S) for c in conversations))
    finally:
        await asyncio.gather(*(c.close() for c in conversations), return_exceptions=True)
    return {
        "affected": len(affected),
        "rerouted_s": list(rerouted.values()),
        "lost": sum(1 for r in outcomes if r.errors),
        "lost_unaffected": sum(1 for cid, r in zip(ids, outcomes) if r.errors and cid not in affected),
        "most_lost_in_one": max((r.errors.count("stage_failed") for r in outcomes), default=0),
        "third_failed": sum(1 for r in third if r.errors),
    }


async def run(args: argparse.Namespace, redis_url: str) -> None:
    rounds = []
    with FakeLlmServer(FakeLlm(echo=True, token_delay_s=0.05)) as llm:
        for index in range(args.rounds):
            cluster = Cluster(redis_url, llm.base_url, Path(tempfile.mkdtemp(prefix="replica-failure-")), settings=REPLICA_SETTINGS)
            try:
                rounds.append(await one_round(cluster, args.conversations))
            finally:
                cluster.stop()
            r = rounds[-1]
            print(
                f"round {index + 1}: {r['affected']} of {args.conversations} conversations affected, "
                f"re-routed in max {max(r['rerouted_s'], default=0):.2f} s, {r['lost']} turns lost, "
                f"{r['third_failed']} next turns failed"
            )
    times = [t for r in rounds for t in r["rerouted_s"]]
    affected = sum(r["affected"] for r in rounds)
    print(f"\nreplica SIGKILL (one process of each stage of two) -> conversations re-routed, {args.rounds} rounds")
    print(f"  conversations affected: {affected} of {args.rounds * args.conversations}")
    print(f"  re-routed: p50 {percentile(times, 50):.2f} s   p99 {percentile(times, 99):.2f} s   max {max(times):.2f} s"
          f"   (target <= STALE_TIMEOUT_S = 4 s; WORKER_TTL_S = 2 s)")
    print(f"  turns lost: {sum(r['lost'] for r in rounds)} (of them in unaffected conversations: "
          f"{sum(r['lost_unaffected'] for r in rounds)}); most in one conversation: "
          f"{max(r['most_lost_in_one'] for r in rounds)} (target <= 1)")
    print(f"  hung turns: 0; next turns failed: {sum(r['third_failed'] for r in rounds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis = TestRedis()
    try:
        asyncio.run(run(args, redis.url))
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
