"""The worker directory reads heartbeats as untrusted input: broken ones are skipped, never fatal."""
from __future__ import annotations

import json

import fakeredis.aioredis

from gateway.directory import WorkerDirectory
from shared.channels import Names
from shared.clock import now_ms

NAMES = Names("t", "connection_events", "tts_control")


async def beat(client, stage: str, worker_id: str, raw: bytes | str) -> None:
    await client.set(NAMES.worker(stage, worker_id), raw)
    await client.zadd(NAMES.workers(stage), {worker_id: now_ms()})


def record(worker_id: str, stage: str, **extra) -> str:
    return json.dumps({"worker_id": worker_id, "stage": stage, "last_heartbeat_ms": now_ms(), **extra})


async def test_broken_records_are_skipped_and_good_ones_kept(caplog):
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "tts", "tts-good", record("tts-good", "tts", conversations=2, sample_rate=22050))
    await beat(client, "tts", "tts-cut", '{"worker_id": "tts-cut", "stage"')
    await beat(client, "tts", "tts-deep", "[" * 100_000)
    await beat(client, "llm", "llm-types", record("llm-types", "llm", conversations="many"))
    await beat(client, "llm", "llm-negative", record("llm-negative", "llm", conversations=-1))
    await beat(client, "llm", "llm-other", record("llm-impostor", "llm"))
    await beat(client, "vad_stt", "vad-stage", record("vad-stage", "tts"))
    await beat(client, "vad_stt", "vad-bytes", b'{"worker_id": "\xff"}')
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    assert [w.worker_id for w in directory.workers["tts"]] == ["tts-good"]
    assert directory.workers["llm"] == [] and directory.workers["vad_stt"] == []
    assert directory.missing() == ["vad_stt", "llm"] and directory.output_sample_rate() == 22050
    assert directory.skipped == 7
    warned = [r for r in caplog.records if "unreadable heartbeat" in r.getMessage()]
    assert len(warned) == 7
    await directory.refresh()  # the same broken keys again: counted, not warned about again
    assert directory.skipped == 14 and len([r for r in caplog.records if "unreadable heartbeat" in r.getMessage()]) == 7


async def test_only_numbers_are_kept_of_the_free_form_stats():
    client = fakeredis.aioredis.FakeRedis()
    stats = {"stale_cleaned": 3, "cleanup_ms_sum": 1.5, "bad": "lots", "flag": True, "buckets": {"1": 2, "+Inf": 3},
             "broken_buckets": {"1": "x"}, "nested": {"a": {"b": 1}}, "list": [1, 2]}
    await beat(client, "tts", "tts-1", record("tts-1", "tts", stats=stats))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    [worker] = directory.workers["tts"]
    assert worker.stats == {"stale_cleaned": 3, "cleanup_ms_sum": 1.5, "buckets": {"1": 2, "+Inf": 3}}


async def test_a_draining_worker_gets_no_new_conversation_while_another_is_live():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "llm", "llm-idle-draining", record("llm-idle-draining", "llm", conversations=0, draining=True))
    await beat(client, "llm", "llm-busy", record("llm-busy", "llm", conversations=9))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    assert [directory.pick("llm").worker_id for _ in range(3)] == ["llm-busy"] * 3
    await client.delete(NAMES.worker("llm", "llm-busy"))  # the last one left, draining: still served
    await directory.refresh()
    assert directory.pick("llm").worker_id == "llm-idle-draining" and "llm" not in directory.missing()
