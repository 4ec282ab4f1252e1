"""A fair share of one model between conversations: round-robin over per-conversation FIFO queues.

A model (whisper, piper) computes one request at a time. Behind a plain lock, whoever queued most
is served most: a client that sends commits or typed turns in a loop keeps the model busy, and
another conversation's first request waits behind all of it. Here every conversation (the `key`)
has its own FIFO queue, and the model's single thread serves the conversations in turn, one job
each per round, so a newcomer waits for the job under way and at most one job of each other
waiting conversation, however much any of them queued. Within one conversation jobs keep their
order (transcripts and speech leave in order).

Urgent work first: a job submitted `urgent=True` (a turn's first piece of speech, a final
transcript: what a user is waiting on right now) makes its conversation go before conversations
that have only non-urgent work queued (later pieces of a reply that is already playing, interim or
early transcripts). Order within a conversation is kept, so an urgent job behind a non-urgent one
of its own conversation takes that one along first. Among conversations with urgent work, and
among those without, it stays round-robin. `promote` makes a waiting job urgent (an early
transcript that has just become the final one).

Everything but the model call runs on the event loop: queues, dispatch and completion are
callbacks there, so no task of its own is needed and nothing here can outlive its callers.
The model call runs on the scheduler's own thread (one job at a time), never on the event loop.

Cancellation: a caller cancelled while its job waits takes the job out of its queue (`drop` takes
out a whole conversation's). A model call cannot be interrupted, so a caller cancelled while its
job runs returns at once, the result is discarded, and the next job starts when the call ends.

`served` records every dispatch (key, label, and the dispatch count when the job was queued), so
tests and diagnostics can check the order the model was actually shared in."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("voicepipe.fair")

SERVED_KEPT = 1024  # dispatches remembered in `served`


@dataclass(frozen=True)
class Served:
    """One dispatch: `queued_at` and `dispatched` count dispatches, so the jobs that ran between a
    job's queueing and its own turn are `served[queued_at:dispatched]` (while nothing was forgotten)."""

    key: str
    label: str
    queued_at: int
    dispatched: int
    urgent: bool = False


@dataclass(eq=False)
class Job(Generic[T]):
    """One model call for one conversation. `started` turns true on the event loop at dispatch, so
    until then the caller may still change what the call will read (see VAD/STT merging)."""

    key: str
    label: str
    call: Callable[[], T]
    future: asyncio.Future[T]
    queued_at: int
    started: bool = False
    urgent: bool = False  # its conversation goes before those with only non-urgent work queued
    run_ms: float | None = None  # the model call's own duration, once it ended
    _context: contextvars.Context = field(default_factory=contextvars.copy_context, repr=False)

    def __await__(self):
        return self.future.__await__()


class FairScheduler:
    """Round-robin between keys, FIFO within a key, one job at a time on one thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queues: dict[str, deque[Job[Any]]] = {}  # waiting jobs per key
        self._ring: deque[str] = deque()  # keys with waiting jobs, in the order they are served
        self._running: Job[Any] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._dispatched = 0
        self.served: deque[Served] = deque(maxlen=SERVED_KEPT)

    # ---- callers
    def submit(self, key: str, call: Callable[[], T], label: str = "", *, urgent: bool = False) -> Job[T]:
        """Queue `call` (run on the model's thread) for conversation `key`; await the job for its result.
        `urgent`: someone waits on it now, see the module docstring."""
        loop = asyncio.get_running_loop()
        job: Job[T] = Job(key, label, call, loop.create_future(), self._dispatched, urgent=urgent)
        job.future.add_done_callback(lambda _f: self._withdraw(job))
        self._queues.setdefault(key, deque()).append(job)
        if key not in self._ring and (self._running is None or self._running.key != key):
            self._ring.append(key)
        self._dispatch()
        return job

    async def run(self, key: str, call: Callable[[], T], label: str = "", *, urgent: bool = False) -> T:
        return await self.submit(key, call, label, urgent=urgent)

    def promote(self, job: Job[Any]) -> None:
        """Make a job urgent; a job already started or done is left as it is."""
        if not job.started and not job.future.done():
            job.urgent = True

    def drop(self, key: str) -> int:
        """Cancel every waiting job of `key` (a job under way ends by itself); how many were dropped."""
        waiting = list(self._queues.get(key, ()))
        for job in waiting:
            job.future.cancel()
            self._remove(job)  # at once: the future's own callback only runs at the next loop turn
        return len(waiting)

    def waiting(self, key: str | None = None) -> int:
        """Jobs queued and not started, of one key or of all."""
        if key is not None:
            return len(self._queues.get(key, ()))
        return sum(len(q) for q in self._queues.values())

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def running(self) -> str | None:
        """The key whose job the model is computing now."""
        return self._running.key if self._running is not None else None

    def close(self) -> None:
        """Cancel every waiting job and let the thread go once the job under way (if any) ends."""
        for key in list(self._queues):
            self.drop(key)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---- the model's side: everything here runs on the event loop
    def _withdraw(self, job: Job[Any]) -> None:
        """A waiting job whose caller went away leaves its queue (a started one is left to finish)."""
        if not job.started and job.future.cancelled():
            self._remove(job)

    def _remove(self, job: Job[Any]) -> None:
        queue = self._queues.get(job.key)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:
            return
        if not queue:
            del self._queues[job.key]
            try:
                self._ring.remove(job.key)
            except ValueError:
                pass

    def _first_key(self) -> str:
        """The first key in the ring with an urgent job waiting, else the first key."""
        for key in self._ring:
            if any(job.urgent and not job.future.done() for job in self._queues[key]):
                return key
        return self._ring[0]

    def _next(self) -> Job[Any] | None:
        """The head job of the chosen key (`_first_key`), which leaves the ring until that job has ended."""
        while self._ring:
            key = self._first_key()
            queue = self._queues[key]
            job = queue.popleft()
            if not queue:
                del self._queues[key]
            if job.future.done():  # cancelled a moment ago: its done callback has not run yet
                if key not in self._queues:
                    self._ring.remove(key)
                continue
            self._ring.remove(key)
            return job
        return None

    def _dispatch(self) -> None:
        if self._running is not None:
            return
        job = self._next()
        if job is None:
            return
        self._running = job
        job.started = True
        self.served.append(Served(job.key, job.label, job.queued_at, self._dispatched, job.urgent))
        self._dispatched += 1
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.name)
        try:
            done = asyncio.wrap_future(self._executor.submit(job._context.run, self._timed, job))
        except RuntimeError as exc:  # the executor was shut down (close) under us
            self._finished(job, None, exc)
            return
        done.add_done_callback(lambda f: self._finished(job, f, None))

    @staticmethod
    def _timed(job: Job[T]) -> T:
        started = time.perf_counter()
        try:
            return job.call()
        finally:
            job.run_ms = (time.perf_counter() - started) * 1000

    def _finished(self, job: Job[Any], done: asyncio.Future[Any] | None, error: BaseException | None) -> None:
        self._running = None
        if not job.future.done():  # else its caller was cancelled while it ran: the result is discarded
            if done is not None and done.cancelled():
                job.future.cancel()
            elif done is not None and done.exception() is None:
                job.future.set_result(done.result())
            else:
                job.future.set_exception(error if error is not None else done.exception())
        elif done is not None and not done.cancelled() and done.exception() is not None:
            log.debug("%s: an abandoned job failed: %r", self.name, done.exception())
        if job.key in self._queues and job.key not in self._ring:
            self._ring.append(job.key)  # behind everyone who waited meanwhile
        self._dispatch()
