"""The orchestrator's verdict on its LLM server (workers/llm_orchestrator/readiness.py), with a fake
check: a busy server (its model list times out while it showed life recently) stays ready; a
refused one, or one silent for longer than the grace, is not."""
from __future__ import annotations

import asyncio

from workers.llm_orchestrator.llm_client import LlmTimeout, LlmUnavailable
from workers.llm_orchestrator.readiness import LlmReadiness


class FakeCheck:
    def __init__(self) -> None:
        self.outcome: BaseException | None = None
        self.calls = 0

    async def __call__(self, timeout_s: float) -> None:
        self.calls += 1
        if self.outcome is not None:
            raise self.outcome


async def test_a_refused_server_is_not_ready_at_once_and_ready_again_when_it_answers():
    check = FakeCheck()
    readiness = LlmReadiness(check)
    assert readiness.ok is None
    assert await readiness.check_now() is True
    check.outcome = LlmUnavailable("LLM server is unreachable")
    assert await readiness.check_now() is False
    check.outcome = None
    assert await readiness.check_now() is True


async def test_a_busy_server_stays_ready_within_the_grace_and_not_after():
    check = FakeCheck()
    readiness = LlmReadiness(check, busy_grace_s=0.2)
    await readiness.check_now()
    check.outcome = LlmTimeout("LLM server did not list its models in time")
    assert await readiness.check_now() is True and readiness.busy == 1  # it answered a moment ago
    await asyncio.sleep(0.25)
    assert await readiness.check_now() is False  # silent for longer than the grace
    readiness.answered()  # a reply streamed to its end
    assert readiness.ok is True
    assert await readiness.check_now() is True and readiness.busy == 2


async def test_a_server_never_seen_alive_that_times_out_is_not_ready():
    check = FakeCheck()
    check.outcome = LlmTimeout("LLM server did not list its models in time")
    readiness = LlmReadiness(check)
    assert await readiness.check_now() is False


async def test_a_failed_reply_wakes_the_loop_at_once():
    check = FakeCheck()
    readiness = LlmReadiness(check, interval_s=3600)
    await readiness.check_now()
    loop = asyncio.create_task(readiness.run())
    try:
        check.outcome = LlmUnavailable("LLM server is unreachable")
        readiness.failed()
        async with asyncio.timeout(5):
            while readiness.ok is not False:
                await asyncio.sleep(0.01)
        assert check.calls == 2
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_no_check_while_a_reply_streams():
    """A queued check would hold one of llama-cpp-python's server threads: the reply is the check."""
    check = FakeCheck()
    streams = [1]
    readiness = LlmReadiness(check, streaming=lambda: streams[0])
    assert await readiness.check_now() is False and check.calls == 0  # not asked yet, and not now
    readiness.answered()
    streams[0] = 0
    assert await readiness.check_now() is True and check.calls == 1


async def test_after_a_slow_check_the_next_waits_the_full_interval():
    """A refused connection is retried every second; a server that took the connection but was slow
    is not asked again before the interval (each such check would queue behind its replies)."""
    check = FakeCheck()
    readiness = LlmReadiness(check, interval_s=30)
    check.outcome = LlmUnavailable("LLM server is unreachable")
    await readiness.check_now()
    assert readiness.ok is False and readiness.next_wait_s() == 1.0
    check.outcome = LlmTimeout("LLM server did not list its models in time")
    await readiness.check_now()
    assert readiness.ok is False and readiness.next_wait_s() == 30
    check.outcome = None
    await readiness.check_now()
    assert readiness.ok is True and readiness.next_wait_s() == 30
