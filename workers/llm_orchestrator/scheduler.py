"""Who generates next on a one-at-a-time LLM server: a turn's first slice before other replies' rest.

llama.cpp's server (the embedded one) generates one reply at a time and queues the others whole,
so a new question waits for every reply generated before it, to its last token. What a user waits
on is the first piece of speech of their reply, a dozen tokens; the rest of a reply only has to
stay ahead of its own playback, which is far slower than generation. So generation is handed out
in slices by rank:

- `FIRST`: a confirmed turn's first slice (up to its first TTS piece);
- `CONTINUATION`: a later slice of a confirmed reply;
- `SPECULATIVE`: any slice of a reply started on an early transcript, before the turn is
  confirmed; it must never delay a confirmed turn of another conversation.

A holder whose rank is worse than a waiter's is `outranked`: it stops its upstream request at its
next token and waits again as a continuation (see slices.py), so the waiter gets the server within
one token. A first slice is not outranked by another first slice. A speculation confirmed while it
waits is promoted in the queue at once (`acquire(promote_on=...)`): the turn it answers is now one
a user waits on, and must not stay behind every continuation. Between two slices a reply waits
again, behind the waiters of its rank, so long replies take turns instead of the newest one
finishing while an older one, already playing, waits. Waiters of one rank are served in the order
they came.
A conversation has one reply generating at a time, so its slices keep their order by themselves.

Everything runs on the event loop; a waiter cancelled (or timed out) leaves the queue at once, and a
slot is released in the caller's `finally`, so nothing here outlives its callers. The scheduler is
per orchestrator process: several orchestrator processes in front of one server do not see each
other's slices (the server then queues what they send)."""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

GRANTS_KEPT = 1024  # grants remembered in `granted`


class Rank(IntEnum):
    """Lower goes first."""

    FIRST = 0
    CONTINUATION = 1
    SPECULATIVE = 2


@dataclass(eq=False)
class Slot:
    """The right to have one request generating upstream; `rank` may drop while it is held (a
    first slice that is done ranks as a continuation)."""

    rank: Rank
    label: str
    released: bool = False


@dataclass(frozen=True)
class Grant:
    """One slot handed out: to whom and at which rank (`granted` keeps them in order)."""

    label: str
    rank: Rank


@dataclass(order=True)
class _Waiter:
    rank: Rank
    seq: int
    label: str = field(compare=False)
    future: asyncio.Future[Slot] = field(compare=False)


class GenerationScheduler:
    """`slots` requests generating at once (the server's width); the rest wait by rank, then FIFO."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError("a scheduler needs at least one slot")
        self.slots = slots
        self._holders: list[Slot] = []
        self._waiters: list[_Waiter] = []  # a heap
        self._seq = itertools.count()
        self.granted: deque[Grant] = deque(maxlen=GRANTS_KEPT)
        self.preemptions = 0

    # ---- callers
    async def acquire(
        self,
        rank: Rank,
        label: str = "",
        *,
        promote_on: asyncio.Event | None = None,
        promoted: Rank = Rank.FIRST,
        after: Slot | None = None,
        yielded: bool = False,
    ) -> Slot:
        """Wait for a slot at `rank`, or at `promoted` from the moment `promote_on` is set;
        cancellation (or a timeout around it) leaves the queue. `after`: the caller's slot for its
        previous slice, given back (`yielded`: it was outranked) once this request is queued, so
        the slot goes to the best of the waiters counting this one, never to a worse-ranked one
        that happened to wait while the caller was between two slices."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(rank, next(self._seq), label, loop.create_future())
        heapq.heappush(self._waiters, waiter)
        if after is not None:
            self.release(after, yielded=yielded)
        self._dispatch()
        try:
            if promote_on is not None and not waiter.future.done():
                promotion = asyncio.ensure_future(promote_on.wait())
                try:
                    await asyncio.wait((waiter.future, promotion), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    promotion.cancel()
                if not waiter.future.done() and promoted < waiter.rank:
                    self._rerank(waiter, promoted)
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # granted in the same loop turn it was cancelled
            else:
                self._forget(waiter)
            raise

    def release(self, slot: Slot, *, yielded: bool = False) -> None:
        """Give the slot back (idempotent). `yielded`: the holder stopped because it was outranked."""
        if slot.released:
            return
        slot.released = True
        self._holders.remove(slot)
        if yielded:
            self.preemptions += 1
        self._dispatch()

    def outranked(self, slot: Slot) -> bool:
        """Whether a waiter should have this slot instead (a better rank than the holder's now)."""
        self._drop_cancelled()
        return bool(self._waiters) and self._waiters[0].rank < slot.rank

    @property
    def waiting(self) -> int:
        self._drop_cancelled()
        return len(self._waiters)

    @property
    def holding(self) -> int:
        return len(self._holders)

    # ---- inside
    def _drop_cancelled(self) -> None:
        while self._waiters and self._waiters[0].future.done():
            heapq.heappop(self._waiters)

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        heapq.heapify(self._waiters)

    def _rerank(self, waiter: _Waiter, rank: Rank) -> None:
        self._forget(waiter)
        waiter.rank = rank
        heapq.heappush(self._waiters, waiter)
        self._dispatch()

    def _dispatch(self) -> None:
        while len(self._holders) < self.slots:
            self._drop_cancelled()
            if not self._waiters:
                break
            waiter = heapq.heappop(self._waiters)
            slot = Slot(waiter.rank, waiter.label)
            self._holders.append(slot)
            self.granted.append(Grant(waiter.label, waiter.rank))
            waiter.future.set_result(slot)
