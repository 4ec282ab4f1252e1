"""History: trimming and the Redis hash kept for resume."""
import json

import fakeredis.aioredis

from shared.channels import Names
from workers.llm_orchestrator.history import HistoryStore, parse, trim

NAMES = Names("t", "connection_events", "tts_control")


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def test_trim_keeps_the_newest_within_both_budgets_and_starts_with_the_user():
    messages = turn(1) + turn(2) + turn(3)
    assert trim(messages, 4, 10_000) == turn(2) + turn(3)
    assert trim(messages, 3, 10_000) == turn(3)  # would start with a reply, so that is dropped
    assert trim(messages, 10, 4) == turn(3)
    assert trim(messages, 0, 100) == []


def test_parse_skips_anything_malformed():
    assert parse(None) == [] and parse(b"{not json") == [] and parse(b'{"a": 1}') == []
    raw = json.dumps([{"role": "user", "content": "hi"}, {"role": "user"}, "x", {"role": "assistant", "content": "yo"}])
    assert parse(raw) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


async def test_store_appends_trims_and_keeps_the_resume_token():
    client = fakeredis.aioredis.FakeRedis()
    store = HistoryStore(client, NAMES, ttl_s=100, max_messages=4, max_chars=10_000)
    await client.hset(NAMES.history("c1"), "resume_token", "tok")
    for i in range(3):
        await store.append("c1", *turn(i))
    assert await store.load("c1") == turn(1) + turn(2)
    assert await client.hget(NAMES.history("c1"), "resume_token") == b"tok"
    assert 0 < await client.ttl(NAMES.history("c1")) <= 100
    await client.persist(NAMES.history("c1"))
    await store.keep_for_resume("c1")
    assert 0 < await client.ttl(NAMES.history("c1")) <= 100
    assert await store.load("unknown") == []


def test_a_message_longer_than_half_the_budget_is_cut_so_the_newest_turn_fits():
    long_turn = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    assert trim(turn(1) + long_turn, 10, 20) == [
        {"role": "user", "content": "x" * 9 + "…"}, {"role": "assistant", "content": "y" * 9 + "…"},
    ]
    assert trim(turn(1) + long_turn[:1], 10, 24) == turn(1) + [{"role": "user", "content": "x" * 11 + "…"}]


def test_parse_survives_deep_nesting():
    assert parse(b"[" * 100_000 + b"]" * 100_000) == []


async def test_the_stored_copy_is_bounded_in_characters_too():
    client = fakeredis.aioredis.FakeRedis()
    store = HistoryStore(client, NAMES, ttl_s=100, max_messages=1000, max_chars=100)
    for i in range(50):
        await store.append("c1", {"role": "user", "content": f"question {i} " + "q" * 20}, {"role": "assistant", "content": "a" * 30})
    await store.append("c1", {"role": "user", "content": "u" * 5000}, {"role": "assistant", "content": "r" * 5000})
    stored = json.loads(await client.hget(NAMES.history("c1"), "messages"))
    assert stored == [{"role": "user", "content": "u" * 49 + "…"}, {"role": "assistant", "content": "r" * 49 + "…"}]
    assert await store.load("c1") == stored  # what is stored is what the LLM gets
