"""The fair scheduler (shared/fair.py) with a fake blocking model: order, fairness, cancellation."""
from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from shared.fair import FairScheduler


class BlockingModel:
    """A model call that blocks its thread until the test lets it finish, and records what ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self._release: dict[str, threading.Event] = {}
        self._entered: dict[str, threading.Event] = {}
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def call(self, name: str, hold: bool = False):
        """The function to submit: runs `name`, waiting for `release(name)` first when `hold`."""
        release = self._release.setdefault(name, threading.Event())
        entered = self._entered.setdefault(name, threading.Event())
        if not hold:
            release.set()

        def run() -> str:
            with self._lock:
                self.active += 1
                self.most_active = max(self.most_active, self.active)
            entered.set()
            try:
                if not release.wait(10):
                    raise TimeoutError(f"{name} was never released")
                self.ran.append(name)
                return name.upper()
            finally:
                with self._lock:
                    self.active -= 1

        return run

    def release(self, name: str) -> None:
        self._release[name].set()

    async def entered(self, name: str) -> None:
        entered = self._entered.setdefault(name, threading.Event())
        assert await asyncio.to_thread(entered.wait, 10), f"{name} never started"


@pytest.fixture
def scheduler():
    s = FairScheduler("test-model")
    yield s
    s.close()


async def test_keys_are_served_round_robin_and_fifo_within_a_key(scheduler):
    model = BlockingModel()
    blocker = scheduler.submit("x", model.call("x0", hold=True), "x0")
    await model.entered("x0")
    jobs = [scheduler.submit("a", model.call(f"a{i}"), f"a{i}") for i in range(4)]
    jobs += [scheduler.submit("b", model.call(f"b{i}"), f"b{i}") for i in range(2)]
    jobs += [scheduler.submit("c", model.call("c0"), "c0")]
    model.release("x0")
    assert await blocker == "X0"
    assert await asyncio.gather(*jobs) == ["A0", "A1", "A2", "A3", "B0", "B1", "C0"]
    assert model.ran == ["x0", "a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert [s.label for s in scheduler.served] == model.ran
    assert model.most_active == 1  # one job at a time on the model


async def test_a_newcomer_waits_for_the_job_under_way_only_not_for_a_busy_conversation_queue(scheduler):
    """One conversation queued ten jobs; another's first job is next once the running one ends."""
    model = BlockingModel()
    busy = [scheduler.submit("busy", model.call(f"busy{i}", hold=i == 0), f"busy{i}") for i in range(10)]
    await model.entered("busy0")
    newcomer = scheduler.submit("new", model.call("new0"), "new0")
    assert scheduler.waiting("busy") == 9 and scheduler.waiting("new") == 1
    model.release("busy0")
    assert await newcomer == "NEW0"
    await asyncio.gather(*busy)
    assert model.ran[:2] == ["busy0", "new0"]
    record = {s.label: s for s in scheduler.served}
    # what ran between the newcomer's queueing and its own turn: nothing (busy0 was already running)
    assert [s.label for s in scheduler.served if record["new0"].queued_at <= s.dispatched < record["new0"].dispatched] == []


async def test_a_key_served_while_others_wait_goes_behind_them(scheduler):
    """Round-robin holds for keys that arrive while a key of theirs is running, too."""
    model = BlockingModel()
    first = scheduler.submit("a", model.call("a0", hold=True), "a0")
    await model.entered("a0")
    a1 = scheduler.submit("a", model.call("a1"), "a1")  # the running key queues more
    b0 = scheduler.submit("b", model.call("b0"), "b0")  # a newcomer arrives after it
    model.release("a0")
    await asyncio.gather(first, a1, b0)
    assert model.ran == ["a0", "b0", "a1"]


async def test_a_cancelled_waiting_job_leaves_its_queue(scheduler):
    model = BlockingModel()
    running = scheduler.submit("a", model.call("a0", hold=True), "a0")
    await model.entered("a0")

    async def caller(key: str, name: str) -> str:
        return await scheduler.run(key, model.call(name), name)

    doomed = asyncio.create_task(caller("b", "b0"))
    kept = asyncio.create_task(caller("c", "c0"))
    await asyncio.sleep(0)  # both have queued their jobs
    assert scheduler.waiting() == 2
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert scheduler.waiting() == 1 and scheduler.waiting("b") == 0
    model.release("a0")
    assert await running == "A0" and await kept == "C0"
    assert model.ran == ["a0", "c0"]  # b0 never ran


async def test_drop_takes_a_whole_conversation_out_of_the_queue(scheduler):
    model = BlockingModel()
    running = scheduler.submit("a", model.call("a0", hold=True), "a0")
    await model.entered("a0")
    gone = [scheduler.submit("gone", model.call(f"g{i}"), f"g{i}") for i in range(3)]
    stays = scheduler.submit("stays", model.call("s0"), "s0")
    assert scheduler.drop("gone") == 3
    assert scheduler.waiting("gone") == 0 and all(job.future.cancelled() for job in gone)
    assert scheduler.drop("gone") == 0  # idempotent
    model.release("a0")
    await asyncio.gather(running, stays)
    assert model.ran == ["a0", "s0"]


async def test_a_job_cancelled_while_running_lets_the_next_start_when_it_ends(scheduler):
    model = BlockingModel()

    async def caller() -> str:
        return await scheduler.run("a", model.call("a0", hold=True), "a0")

    task = asyncio.create_task(caller())
    await model.entered("a0")
    following = scheduler.submit("b", model.call("b0"), "b0")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # the caller returns at once ...
    assert scheduler.busy and not following.started  # ... but the model call cannot be interrupted
    model.release("a0")
    assert await following == "B0"  # and the next job starts once it has ended
    assert model.ran == ["a0", "b0"] and not scheduler.busy


async def test_a_failing_job_fails_its_caller_only(scheduler):
    def boom() -> str:
        raise ValueError("model exploded")

    failing = scheduler.submit("a", boom, "boom")
    fine = scheduler.submit("b", lambda: "ok", "fine")
    with pytest.raises(ValueError, match="model exploded"):
        await failing
    assert await fine == "ok"


async def test_the_call_runs_off_the_event_loop_in_the_callers_context_and_is_timed(scheduler):
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    marker.set("caller")
    loop_thread = threading.get_ident()
    job = scheduler.submit("a", lambda: (threading.get_ident(), marker.get()), "ctx")
    thread, seen = await job
    assert thread != loop_thread and seen == "caller"
    assert job.run_ms is not None and job.run_ms >= 0


async def test_close_cancels_waiting_jobs(scheduler):
    model = BlockingModel()
    running = scheduler.submit("a", model.call("a0", hold=True), "a0")
    await model.entered("a0")
    waiting = scheduler.submit("b", model.call("b0"), "b0")
    scheduler.close()
    assert waiting.future.cancelled()
    model.release("a0")
    assert await running == "A0"


async def test_urgent_work_goes_before_other_conversations_non_urgent_work_in_order_within_its_own(scheduler):
    """A reply's first piece (urgent) goes before other replies' later pieces; in its own
    conversation it still waits for what was queued before it."""
    model = BlockingModel()
    blocker = scheduler.submit("x", model.call("x0", hold=True), "x0")
    await model.entered("x0")
    jobs = [scheduler.submit("a", model.call(f"a{i}"), f"a{i}") for i in range(2)]  # later pieces
    jobs += [scheduler.submit("b", model.call("b0"), "b0")]
    jobs += [scheduler.submit("c", model.call("c0"), "c0"), scheduler.submit("c", model.call("c1"), "c1", urgent=True)]
    jobs += [scheduler.submit("d", model.call("d0"), "d0", urgent=True)]
    model.release("x0")
    await blocker
    await asyncio.gather(*jobs)
    assert model.ran == ["x0", "c0", "d0", "c1", "a0", "b0", "a1"]


async def test_a_promoted_job_goes_before_non_urgent_work_and_a_started_one_is_left_as_it_is(scheduler):
    model = BlockingModel()
    blocker = scheduler.submit("x", model.call("x0", hold=True), "x0")
    await model.entered("x0")
    scheduler.promote(blocker)  # under way: nothing to change
    assert not blocker.urgent
    early = [scheduler.submit("a", model.call("a0"), "a0"), scheduler.submit("b", model.call("b0"), "b0")]
    scheduler.promote(early[1])  # an early transcript that became the final one
    model.release("x0")
    await asyncio.gather(blocker, *early)
    assert model.ran == ["x0", "b0", "a0"]
