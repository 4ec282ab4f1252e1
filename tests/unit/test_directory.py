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


async def test_an_orchestrators_llm_verdict_is_read_strictly():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "llm", "llm-up", record("llm-up", "llm", llm_ok=True))
    await beat(client, "llm", "llm-down", record("llm-down", "llm", llm_ok=False))
    await beat(client, "llm", "llm-old", record("llm-old", "llm"))
    await beat(client, "llm", "llm-text", record("llm-text", "llm", llm_ok="yes"))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    verdicts = {w.worker_id: w.llm_ok for w in directory.workers["llm"]}
    assert verdicts == {"llm-up": True, "llm-down": False, "llm-old": None}  # "yes" is no boolean: skipped


async def test_new_conversations_go_to_an_orchestrator_that_reaches_its_llm():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "llm", "llm-down", record("llm-down", "llm", conversations=0, llm_ok=False))
    await beat(client, "llm", "llm-up", record("llm-up", "llm", conversations=5, llm_ok=True))
    await beat(client, "llm", "llm-new", record("llm-new", "llm", conversations=7))  # not reported yet
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    assert [directory.pick("llm").worker_id for _ in range(3)] == ["llm-up", "llm-up", "llm-new"]
    await client.delete(NAMES.worker("llm", "llm-up"), NAMES.worker("llm", "llm-new"))
    await directory.refresh()  # no orchestrator reaches its LLM: /readyz says so, and one is still picked
    assert directory.pick("llm").worker_id == "llm-down"


async def test_pick_skips_draining_workers_and_weighs_conversations_and_cpu():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "llm", "llm-a", record("llm-a", "llm", conversations=3, cpu=0.0))
    await beat(client, "llm", "llm-b", record("llm-b", "llm", conversations=1, cpu=1.0))  # fewer, but a core busy
    await beat(client, "llm", "llm-drain", record("llm-drain", "llm", conversations=0, draining=True))
    await beat(client, "tts", "tts-drain", record("tts-drain", "tts", draining=True))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    assert directory.live("llm") == {"llm-a", "llm-b", "llm-drain"}  # draining still serves what it holds
    assert directory.pick("tts") is None and "tts" in directory.missing()
    picks = [directory.pick("llm").worker_id for _ in range(6)]
    assert "llm-drain" not in picks
    # llm-a: 3 held; llm-b: 1 held + 4 for its busy core; picks add up, ties go by id
    assert picks == ["llm-a", "llm-a", "llm-a", "llm-b", "llm-a", "llm-b"]


async def test_picks_since_a_heartbeat_count_until_the_next_one_reports_them():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "llm", "llm-a", record("llm-a", "llm", conversations=0))
    await beat(client, "llm", "llm-b", record("llm-b", "llm", conversations=0))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    assert [directory.pick("llm").worker_id for _ in range(4)] == ["llm-a", "llm-b", "llm-a", "llm-b"]
    await directory.refresh()  # heartbeats not renewed: the 2 + 2 picks still count
    assert [directory.pick("llm").worker_id for _ in range(2)] == ["llm-a", "llm-b"]
    await beat(client, "llm", "llm-a", record("llm-a", "llm", conversations=3, last_heartbeat_ms=now_ms() + 1))
    await directory.refresh()  # llm-a reported its 3: llm-b (0 reported + 3 picked since) is as loaded
    loads = {w.worker_id: directory.load(w) for w in directory.workers["llm"]}
    assert loads == {"llm-a": 3, "llm-b": 3}


async def test_a_worker_whose_inbox_has_no_reader_is_not_live_until_it_reads_again():
    client = fakeredis.aioredis.FakeRedis()
    await beat(client, "tts", "tts-a", record("tts-a", "tts"))
    await beat(client, "tts", "tts-b", record("tts-b", "tts"))
    directory = WorkerDirectory(client, NAMES, worker_ttl_s=5)
    await directory.refresh()
    reader = client.pubsub()
    await reader.subscribe(NAMES.inbox("tts", "tts-b"))
    assert not await directory.check_reachable("tts", "tts-a") and await directory.check_reachable("tts", "tts-b")
    assert directory.live("tts") == {"tts-b"} and {directory.pick("tts").worker_id for _ in range(3)} == {"tts-b"}
    await reader.subscribe(NAMES.inbox("tts", "tts-a"))  # back (it re-subscribed after a Redis blip)
    await directory.refresh()
    assert directory.live("tts") == {"tts-a", "tts-b"}
    await reader.aclose()
