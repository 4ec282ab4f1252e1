"""ChatClient against the fake LLM over real HTTP: every way a reply can end leaves nothing open.

The fake is a real uvicorn server, so "the server saw its client leave" is a TCP close seen by a
real HTTP stack, the way llama.cpp or vLLM would see it. No assertion depends on how fast the
machine is: waits are bounded generously, and only their outcome is checked."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket

import httpx
import pytest

from shared.tasks import stop_tasks
from tests.support.fake_llm import FakeLlm, FakeLlmServer
from voicepipe.embedded import free_port
from workers.llm_orchestrator.llm_client import ChatClient, LlmError, LlmFailure, LlmTimeout, LlmUnavailable

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
BOUND_S = 15.0  # every test finishes well within this, even on a loaded machine


@pytest.fixture
async def make_client():
    made: list[ChatClient] = []

    def make(base_url: str, **options) -> ChatClient:
        options.setdefault("retry_backoff_s", 0.01)
        client = ChatClient(base_url, "fake", **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def reply(client: ChatClient, leave_after: int | None = None) -> list[str]:
    """The deltas of one reply, leaving (break) after `leave_after` of them."""
    deltas: list[str] = []
    async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
        async for delta in stream:
            deltas.append(delta)
            if len(deltas) == leave_after:
                break
    return deltas


def assert_idle(client: ChatClient) -> None:
    assert client.open_streams == 0
    assert client.pool_stats()["in_use"] == 0


async def test_a_complete_stream_yields_every_token_in_order_and_reuses_the_connection(fake_llm, make_client):
    fake_llm.tokens = ["Par", "is", " is", " the", " capi", "tal."]
    client = make_client(fake_llm.base_url)
    async with asyncio.timeout(BOUND_S):
        first = await reply(client)
        second = await reply(client)
    assert first == second == fake_llm.tokens
    assert all(record.completed for record in fake_llm.streams)
    assert client.stats["connects"] == 1 and client.pool_stats()["created"] == 1
    assert fake_llm.streams[0].client_port == fake_llm.streams[1].client_port  # the server saw one connection
    assert client.stats["closed_early"] == 0 and client.stats["failures"] == 0
    assert_idle(client)


async def test_leaving_early_closes_the_connection_so_the_server_stops(fake_llm, make_client):
    fake_llm.token_delay_s = 0.05  # more tokens are always on their way when the caller leaves
    client = make_client(fake_llm.base_url)
    async with asyncio.timeout(BOUND_S):
        assert len(await reply(client, leave_after=2)) == 2
        record = fake_llm.streams[-1]
        ended = await record.wait_ended(timeout=5)
    assert not record.completed and record.tokens_sent < len(fake_llm.tokens_for(MESSAGES))
    assert ended >= record.last_token_at
    assert client.stats["closed_early"] == 1
    assert_idle(client)
    async with asyncio.timeout(BOUND_S):  # the dropped connection is not reused: the next reply connects anew
        await reply(client)
    assert client.stats["connects"] == 2


@pytest.mark.parametrize("where", ["reading", "caller_busy", "stop_tasks"])
async def test_cancelling_the_task_mid_stream_closes_the_connection(fake_llm, make_client, where):
    """Cancelled while waiting for the next token, while the caller awaits something else between
    tokens, and by stop_tasks, which cancels again and again until the task ends."""
    fake_llm.token_delay_s = 0.2
    client = make_client(fake_llm.base_url)
    two_tokens = asyncio.Event()

    async def consume() -> None:
        deltas = 0
        async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
            async for _ in stream:
                deltas += 1
                if deltas == 2:
                    two_tokens.set()
                    if where == "caller_busy":
                        await asyncio.sleep(60)

    async with asyncio.timeout(BOUND_S):
        task = asyncio.create_task(consume())
        await two_tokens.wait()
        if where == "stop_tasks":
            await stop_tasks([task])
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        record = fake_llm.streams[-1]
        await record.wait_ended(timeout=5)
    assert task.cancelled()
    assert not record.completed
    assert client.stats["closed_early"] == 1
    assert_idle(client)


async def test_twenty_concurrent_streams_left_every_way_leave_the_pool_empty(fake_llm, make_client):
    fake_llm.token_delay_s = 0.05
    client = make_client(fake_llm.base_url)
    at_two_tokens = asyncio.Semaphore(0)

    async def leave(way: str) -> None:
        async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
            deltas = 0
            async for _ in stream:
                deltas += 1
                if deltas == 2:
                    at_two_tokens.release()
                    if way == "break":
                        break
                    if way == "raise":
                        raise RuntimeError("the caller failed")
                    await asyncio.sleep(60)  # "cancel": waits here until cancelled

    ways = ["break", "raise", "cancel", "cancel"] * 5
    async with asyncio.timeout(BOUND_S):
        tasks = [asyncio.create_task(leave(way)) for way in ways]
        for _ in tasks:  # all 20 streams are open at once, each two tokens in
            await at_two_tokens.acquire()
        await asyncio.wait([t for t, way in zip(tasks, ways) if way != "cancel"])
        await stop_tasks([t for t, way in zip(tasks, ways) if way == "cancel"])
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for record in fake_llm.streams:
            await record.wait_ended(timeout=5)
    outcomes = {"break": None, "raise": RuntimeError, "cancel": asyncio.CancelledError}
    assert [type(r) if r is not None else None for r in results] == [outcomes[way] for way in ways]
    assert len(fake_llm.streams) == 20
    assert not any(record.completed for record in fake_llm.streams)
    assert client.stats["closed_early"] == 20
    assert_idle(client)


async def test_503_twice_then_a_reply_with_two_retries(fake_llm, make_client, caplog):
    fake_llm.fail_first, fake_llm.fail_first_status = 2, 503
    client = make_client(fake_llm.base_url, retries=2)
    with caplog.at_level(logging.INFO, logger="voicepipe.llm"):
        async with asyncio.timeout(BOUND_S):
            deltas = await reply(client)
    assert "".join(deltas) == fake_llm.reply
    assert client.stats["retries"] == 2 and fake_llm.requests == 3
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    assert_idle(client)


async def test_503_more_often_than_the_retries_is_unavailable_without_the_body(fake_llm, make_client, caplog):
    fake_llm.fail_first, fake_llm.fail_first_status = 3, 503
    client = make_client(fake_llm.base_url, retries=2)
    with caplog.at_level(logging.WARNING, logger="voicepipe.llm"):
        async with asyncio.timeout(BOUND_S):
            with pytest.raises(LlmUnavailable) as failed:
                await reply(client)
    assert failed.value.code == "llm_unavailable"
    assert "503" in str(failed.value) and "overloaded" not in str(failed.value)
    assert any("model overloaded" in r.getMessage() for r in caplog.records)  # the detail is in the log
    assert fake_llm.requests == 3 and client.stats["retries"] == 2 and client.stats["failures"] == 1
    assert not fake_llm.streams
    assert_idle(client)


async def test_429_is_retried_after_the_servers_retry_after(fake_llm, make_client):
    # the backoff alone would wait 15 s or more: finishing within the bound proves Retry-After: 0 was used
    fake_llm.fail_first, fake_llm.fail_first_status, fake_llm.fail_retry_after = 1, 429, "0"
    client = make_client(fake_llm.base_url, retries=2, retry_backoff_s=30)
    async with asyncio.timeout(10):
        deltas = await reply(client)
    assert "".join(deltas) == fake_llm.reply
    assert client.stats["retries"] == 1 and fake_llm.requests == 2


def test_a_long_retry_after_is_capped_and_a_date_ignored():
    def retry_after(value: str) -> float | None:
        return ChatClient._retry_after(httpx.Response(429, headers={"Retry-After": value}))

    assert retry_after("1") == 1.0
    assert retry_after("120") == 2.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


async def test_a_refused_connect_is_retried_until_the_server_is_up(make_client):
    llm = FakeLlm(token_delay_s=0.001)  # its port is free and nothing listens on it yet
    client = make_client(llm.base_url, retries=4, retry_backoff_s=0.5)
    server = FakeLlmServer(llm)
    try:
        async with asyncio.timeout(BOUND_S):
            task = asyncio.create_task(reply(client))
            while client.stats["retries"] == 0:  # the first attempt was refused; the client is backing off
                assert not task.done(), task
                await asyncio.sleep(0.005)
            await asyncio.to_thread(server.__enter__)
            deltas = await task
    finally:
        if server.thread.is_alive():
            server.__exit__(None, None, None)
    assert "".join(deltas) == llm.reply
    assert client.stats["retries"] >= 1 and client.stats["failures"] == 0
    assert_idle(client)


async def test_an_unreachable_server_is_unavailable_after_the_retries(make_client):
    client = make_client(f"http://127.0.0.1:{free_port()}/v1", retries=2)
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmUnavailable, match="unreachable"):
            await reply(client)
    assert client.stats["retries"] == 2 and client.stats["failures"] == 1
    assert_idle(client)


@pytest.fixture
def unanswered_port():
    """A port whose connects hang: a listener that never accepts, its backlog already full (Linux
    drops further SYNs instead of refusing them)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    sockets = [listener]
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        sockets.append(filler)
    probe = sockets[-1]
    _, writable, _ = select.select([], [probe], [], 0.2)
    try:
        if writable:  # the kernel answered the last connect after all: nothing hangs here
            pytest.skip("this kernel does not leave connects to a full backlog unanswered")
        yield port
    finally:
        for sock in sockets:
            sock.close()


async def test_a_connect_timeout_is_llm_timeout_and_not_retried(unanswered_port, make_client):
    client = make_client(f"http://127.0.0.1:{unanswered_port}/v1", connect_timeout_s=0.3, retries=2)
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmTimeout, match="0.3 s") as failed:
            await reply(client)
    assert failed.value.code == "llm_timeout"
    assert client.stats["retries"] == 0 and client.stats["connects"] == 0
    assert_idle(client)


async def test_a_server_stalling_before_the_first_token_times_out_and_is_left(fake_llm, make_client):
    fake_llm.stall_after = 0
    client = make_client(fake_llm.base_url, read_timeout_s=0.3)
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmTimeout) as failed:
            await reply(client)
        record = fake_llm.streams[-1]
        await record.wait_ended(timeout=5)
    assert failed.value.code == "llm_timeout" and "0.3 s" in str(failed.value)
    assert not record.completed and record.tokens_sent == 0
    assert fake_llm.requests == 1  # a read timeout has already waited: not retried
    assert_idle(client)


async def test_a_stall_after_the_first_token_times_out_without_a_retry(fake_llm, make_client):
    fake_llm.stall_after = 1
    client = make_client(fake_llm.base_url, read_timeout_s=0.3)
    deltas: list[str] = []
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmTimeout):
            async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
                async for delta in stream:
                    deltas.append(delta)
        await fake_llm.streams[-1].wait_ended(timeout=5)
    assert deltas == fake_llm.tokens_for(MESSAGES)[:1]
    assert fake_llm.requests == 1 and client.stats["retries"] == 0
    assert_idle(client)


@pytest.mark.parametrize(("status", "failure"), [(400, LlmError), (404, LlmError), (500, LlmUnavailable)])
async def test_other_statuses_are_not_retried(fake_llm, make_client, status, failure):
    fake_llm.fail_status = status
    client = make_client(fake_llm.base_url, retries=2)
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(failure) as failed:
            await reply(client)
    assert str(failed.value) == f"LLM server answered HTTP {status}"  # not "model exploded"
    assert fake_llm.requests == 1 and client.stats["retries"] == 0
    assert_idle(client)


async def test_a_malformed_chunk_is_llm_error(fake_llm, make_client):
    fake_llm.malformed = True
    client = make_client(fake_llm.base_url)
    deltas: list[str] = []
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmError, match="malformed") as failed:
            async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
                async for delta in stream:
                    deltas.append(delta)
        await fake_llm.streams[-1].wait_ended(timeout=5)
    assert failed.value.code == "llm_error" and isinstance(failed.value, LlmFailure)
    assert len(deltas) == 2 and fake_llm.requests == 1
    assert_idle(client)


async def test_a_connection_dropped_mid_stream_is_unavailable_without_a_retry(fake_llm, make_client):
    fake_llm.drop_after = 2
    client = make_client(fake_llm.base_url, retries=2)
    deltas: list[str] = []
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(LlmUnavailable, match="mid-stream"):
            async with contextlib.aclosing(client.stream_chat(MESSAGES)) as stream:
                async for delta in stream:
                    deltas.append(delta)
    assert len(deltas) == 2
    assert fake_llm.requests == 1 and client.stats["retries"] == 0
    assert_idle(client)


async def test_closing_the_client_closes_open_streams_once(fake_llm, make_client, caplog):
    fake_llm.token_delay_s = 0.2
    client = make_client(fake_llm.base_url)
    with caplog.at_level(logging.DEBUG, logger="voicepipe.llm"):
        async with asyncio.timeout(BOUND_S):
            stream = client.stream_chat(MESSAGES)
            await anext(stream)
            await client.aclose()  # closes the response under the open stream
            assert client.open_streams == 0
            await fake_llm.streams[-1].wait_ended(timeout=5)
            await stream.aclose()  # the stream's own close comes second: harmless
    assert client.stats["closed_early"] == 1 and client.open_streams == 0
    assert any("already closed" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
