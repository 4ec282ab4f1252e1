"""Which workers are alive, read from their heartbeats; picks the least-loaded one per stage.

A worker is live while its heartbeat is younger than `WORKER_TTL_S`, unless it was found
unreachable: a message published to its inbox reached no one and PUBSUB NUMSUB confirms the inbox
has no reader (a process killed outright loses its Redis connections at once, long before its
heartbeat runs out). Each refresh asks again for those, so a worker whose reader comes back (it
re-subscribed after a Redis blip) is live again. `pick` chooses among live workers that are not
draining (a draining worker finishes what it holds and takes nothing new) the one with the least
load: conversations held (as its last heartbeat reported them, plus what this gateway gave it since
that heartbeat) and recent CPU.

Heartbeats are JSON that other processes wrote into Redis, so they are parsed like any input: a
record that is not valid JSON, has a field of the wrong type, or names another worker or stage than
its key is skipped (that worker counts as not live) and logged once, never fatal to a refresh.
`stats` is free-form (each worker reports what it counts), so only its numbers, and dicts of
numbers (histogram buckets), are kept: whatever reads them (/metrics, admin) can add them up."""
from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.channels import Names
from shared.clock import now_ms
from shared.stages import STAGES, Stage

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
    llm_ok: bool | None = None  # an orchestrator's LLM server answers (None: not reported)
    subscribed_ms: int = 0  # when its bus subscription was last (re)made (gateway/recovery.py)
    cpu: float = 0.0  # CPU the process used since its previous heartbeat, in cores (1.0: one core busy)
    draining: bool = False  # stopping (SIGTERM): serves what it holds, takes no new conversation


# one core busy counts as this many conversations held: conversations are the main measure, and CPU
# tells apart replicas whose conversations cost differently (speech, long replies)
CPU_WEIGHT = 4.0


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
    llm_ok: bool | None = Field(default=None, strict=True)
    subscribed_ms: int = Field(default=0, ge=0)
    cpu: float = Field(default=0.0, ge=0)
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
        self._picked: defaultdict[str, deque[int]] = defaultdict(deque)  # when this gateway assigned each worker
        self._broken: set[str] = set()  # heartbeat keys already reported as unreadable
        self.skipped = 0  # unreadable heartbeat records seen, in all
        self.unreachable: set[str] = set()  # heartbeating workers whose inbox has no reader

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
        beats = {w.worker_id: w.stage for found in self.workers.values() for w in found}
        if self.unreachable:  # asked again: a worker that re-subscribed is live again
            suspects = [(beats[wid], wid) for wid in self.unreachable if wid in beats]
            back = {wid for stage, wid in suspects if await self._has_reader(stage, wid)}
            self.unreachable -= back | {wid for wid in self.unreachable if wid not in beats}
        self.skipped += len(broken)
        self._broken = broken  # a key that heals and breaks again is reported again
        for wid in [wid for wid in self._picked if wid not in beats]:
            del self._picked[wid]

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
            llm_ok=beat.llm_ok,
            subscribed_ms=beat.subscribed_ms,
            cpu=beat.cpu,
            draining=beat.draining,
        )

    async def _has_reader(self, stage: str, worker_id: str) -> bool:
        inbox = self._names.inbox(stage, worker_id)
        [(_, readers)] = await self._redis.pubsub_numsub(inbox)
        return readers > 0

    async def check_reachable(self, stage: str, worker_id: str) -> bool:
        """After a message to this worker reached no one: does its inbox have a reader? If not, it
        counts as dead from now on (not picked, its conversations re-routed)."""
        if await self._has_reader(stage, worker_id):
            return True
        if worker_id not in self.unreachable:
            log.warning("worker %s has no inbox reader: treated as dead", worker_id)
        self.unreachable.add(worker_id)
        return False

    def _routable(self, stage: str) -> list[WorkerInfo]:
        return [w for w in self.workers[stage] if w.worker_id not in self.unreachable]

    def missing(self) -> list[str]:
        """Stages with no live worker that takes new conversations."""
        return [stage for stage in STAGES if not any(not w.draining for w in self._routable(stage))]

    def live(self, stage: str) -> set[str]:
        """Ids of the stage's live workers, draining ones included (they still serve what they hold)."""
        return {w.worker_id for w in self._routable(stage)}

    def load(self, worker: WorkerInfo) -> float:
        """What `pick` compares: conversations held, those given since the heartbeat, and CPU."""
        picks = self._picked.get(worker.worker_id)
        while picks and picks[0] < worker.last_heartbeat_ms:  # counted in the heartbeat already (a pick in its own ms is not)
            picks.popleft()
        return worker.conversations + (len(picks) if picks else 0) + CPU_WEIGHT * worker.cpu

    def pick(self, stage: str) -> WorkerInfo | None:
        """The least-loaded live worker of the stage that takes new conversations (never a draining one)."""
        candidates = [w for w in self._routable(stage) if not w.draining]
        if not candidates:
            return None
        # an orchestrator whose LLM server does not answer would fail every turn given to it:
        # prefer those that reach theirs (when none does, /readyz says so and any is as good)
        candidates = [w for w in candidates if w.llm_ok is not False] or candidates
        chosen = min(candidates, key=lambda w: (self.load(w), w.worker_id))
        self._picked[chosen.worker_id].append(now_ms())
        return chosen

    def output_sample_rate(self) -> int | None:
        rates = [w.sample_rate for w in self.workers[Stage.TTS] if w.sample_rate]
        return rates[0] if rates else None
