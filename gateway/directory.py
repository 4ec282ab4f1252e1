"""Which workers are alive, read from their heartbeats; picks the least-loaded one per stage."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared.channels import STAGES, Names
from shared.clock import now_ms

log = logging.getLogger("voicepipe.gateway.directory")


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    stage: str
    last_heartbeat_ms: int
    conversations: int
    resources: dict[str, int] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)
    sample_rate: int | None = None


class WorkerDirectory:
    def __init__(self, client: aioredis.Redis, names: Names, worker_ttl_s: float) -> None:
        self._redis = client
        self._names = names
        self._ttl_ms = int(worker_ttl_s * 1000)
        self.workers: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        self._picked: Counter[str] = Counter()  # assignments since the last refresh

    async def refresh(self) -> None:
        now = now_ms()
        for stage in STAGES:
            ids = await self._redis.zrangebyscore(self._names.workers(stage), now - self._ttl_ms, "+inf")
            found: list[WorkerInfo] = []
            if ids:
                keys = [self._names.worker(stage, wid.decode()) for wid in ids]
                for raw in await self._redis.mget(keys):
                    if raw is None:
                        continue  # expired between the two reads
                    data = json.loads(raw)
                    found.append(
                        WorkerInfo(
                            worker_id=data["worker_id"],
                            stage=stage,
                            last_heartbeat_ms=data["last_heartbeat_ms"],
                            conversations=data.get("conversations", 0),
                            resources=data.get("resources", {}),
                            stats=data.get("stats", {}),
                            sample_rate=data.get("sample_rate"),
                        )
                    )
            self.workers[stage] = found
        self._picked.clear()

    def missing(self) -> list[str]:
        return [stage for stage in STAGES if not self.workers[stage]]

    def pick(self, stage: str) -> WorkerInfo | None:
        candidates = self.workers[stage]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda w: (w.conversations + self._picked[w.worker_id], w.worker_id))
        self._picked[chosen.worker_id] += 1
        return chosen

    def output_sample_rate(self) -> int | None:
        rates = [w.sample_rate for w in self.workers["tts"] if w.sample_rate]
        return rates[0] if rates else None
