"""Which workers are alive, read from their heartbeats; picks the least-loaded one per stage.

Heartbeats are JSON that other processes wrote into Redis, so they are parsed like any input: a
record that is not valid JSON, has a field of the wrong type, or names another worker or stage than
its key is skipped (that worker counts as not live) and logged once, never fatal to a refresh.
`stats` is free-form (each worker reports what it counts), so only its numbers, and dicts of
numbers (histogram buckets), are kept: whatever reads them (/metrics, admin) can add them up."""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    draining: bool = False  # stopping (SIGTERM): serves what it holds, takes no new conversation


class _Heartbeat(BaseModel):
    """The heartbeat record a worker writes (workers/runtime.py); extra fields are allowed."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    worker_id: str
    stage: str
    last_heartbeat_ms: int
    conversations: int = Field(default=0, ge=0)
    resources: dict[str, int] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    sample_rate: int | None = Field(default=None, gt=0)
    draining: bool = False

    @field_validator("stats")
    @classmethod
    def _numbers_only(cls, stats: dict[str, Any]) -> dict[str, Any]:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        return {
            name: value
            for name, value in stats.items()
            if number(value) or (isinstance(value, dict) and all(number(v) for v in value.values()))
        }


class WorkerDirectory:
    def __init__(self, client: aioredis.Redis, names: Names, worker_ttl_s: float) -> None:
        self._redis = client
        self._names = names
        self._ttl_ms = int(worker_ttl_s * 1000)
        self.workers: dict[str, list[WorkerInfo]] = {stage: [] for stage in STAGES}
        self._picked: Counter[str] = Counter()  # assignments since the last refresh
        self._broken: set[str] = set()  # heartbeat keys already reported as unreadable
        self.skipped = 0  # unreadable heartbeat records seen, in all

    async def refresh(self) -> None:
        now = now_ms()
        broken: set[str] = set()
        for stage in STAGES:
            ids = await self._redis.zrangebyscore(self._names.workers(stage), now - self._ttl_ms, "+inf")
            found: list[WorkerInfo] = []
            if ids:
                worker_ids = [wid.decode(errors="replace") for wid in ids]
                keys = [self._names.worker(stage, wid) for wid in worker_ids]
                for wid, key, raw in zip(worker_ids, keys, await self._redis.mget(keys)):
                    if raw is None:
                        continue  # expired between the two reads
                    info = self._parse(stage, wid, raw)
                    if info is None:
                        broken.add(key)
                        if key not in self._broken:
                            log.warning("skipped an unreadable heartbeat record %s", key)
                        continue
                    found.append(info)
            self.workers[stage] = found
        self.skipped += len(broken)
        self._broken = broken  # a key that heals and breaks again is reported again
        self._picked.clear()

    @staticmethod
    def _parse(stage: str, worker_id: str, raw: bytes) -> WorkerInfo | None:
        try:
            beat = _Heartbeat.model_validate_json(raw)
        except ValidationError:  # not JSON, nested too deeply, wrong types: all land here
            return None
        if beat.worker_id != worker_id or beat.stage != stage:
            return None  # a record under another worker's key would misroute conversations
        return WorkerInfo(
            worker_id=beat.worker_id,
            stage=stage,
            last_heartbeat_ms=beat.last_heartbeat_ms,
            conversations=beat.conversations,
            resources=beat.resources,
            stats=beat.stats,
            sample_rate=beat.sample_rate,
            draining=beat.draining,
        )

    def missing(self) -> list[str]:
        return [stage for stage in STAGES if not self.workers[stage]]

    def pick(self, stage: str) -> WorkerInfo | None:
        """The least-loaded live worker of the stage, never a draining one while another is live."""
        candidates = [w for w in self.workers[stage] if not w.draining] or self.workers[stage]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda w: (w.conversations + self._picked[w.worker_id], w.worker_id))
        self._picked[chosen.worker_id] += 1
        return chosen

    def output_sample_rate(self) -> int | None:
        rates = [w.sample_rate for w in self.workers["tts"] if w.sample_rate]
        return rates[0] if rates else None
