"""The LLM generation scheduler (workers/llm_orchestrator/scheduler.py) and replies in slices
(slices.py) over a fake completions client: order of grants, preemption, cancellation, cleanup."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from workers.llm_orchestrator.llm_client import Delta
from workers.llm_orchestrator.scheduler import GenerationScheduler, Rank
from workers.llm_orchestrator.slices import SlicedChat


async def until(condition, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def test_first_slices_go_before_continuations_and_speculative_work_last():
    s = GenerationScheduler()
    holder = await s.acquire(Rank.CONTINUATION, "holder")
    order: list[str] = []

    async def take(rank: Rank, label: str) -> None:
        slot = await s.acquire(rank, label)
        order.append(label)
        s.release(slot)

    tasks = [
        asyncio.create_task(take(Rank.SPECULATIVE, "spec")),
        asyncio.create_task(take(Rank.CONTINUATION, "cont-1")),
        asyncio.create_task(take(Rank.FIRST, "first-1")),
        asyncio.create_task(take(Rank.CONTINUATION, "cont-2")),
        asyncio.create_task(take(Rank.FIRST, "first-2")),
    ]
    await until(lambda: s.waiting == 5)
    assert s.outranked(holder)  # a first slice waits: a continuation holder must give way
    s.release(holder, yielded=True)
    await asyncio.gather(*tasks)
    assert order == ["first-1", "first-2", "cont-1", "cont-2", "spec"]  # by rank, then as they came
    assert [g.label for g in s.granted] == ["holder", *order]
    assert s.preemptions == 1 and s.holding == 0 and s.waiting == 0


async def test_a_first_slice_is_not_outranked_by_another_first_slice_but_speculative_work_is_by_any():
    s = GenerationScheduler()
    first = await s.acquire(Rank.FIRST, "a")
    waiter = asyncio.create_task(s.acquire(Rank.FIRST, "b"))
    await until(lambda: s.waiting == 1)
    assert not s.outranked(first)
    first.rank = Rank.CONTINUATION  # its first slice is done
    assert s.outranked(first)
    s.release(first)
    s.release(await waiter)

    spec = await s.acquire(Rank.SPECULATIVE, "spec")
    cont = asyncio.create_task(s.acquire(Rank.CONTINUATION, "cont"))
    await until(lambda: s.waiting == 1)
    assert s.outranked(spec)  # never delays a confirmed reply, not even its continuation
    s.release(spec)
    s.release(await cont)


async def test_a_cancelled_waiter_leaves_the_queue_and_a_released_slot_goes_to_the_next():
    s = GenerationScheduler()
    holder = await s.acquire(Rank.FIRST, "holder")
    gone = asyncio.create_task(s.acquire(Rank.FIRST, "gone"))
    later = asyncio.create_task(s.acquire(Rank.CONTINUATION, "later"))
    await until(lambda: s.waiting == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert s.waiting == 1
    s.release(holder)
    s.release(holder)  # idempotent
    slot = await later
    assert [g.label for g in s.granted] == ["holder", "later"]
    s.release(slot)
    assert s.holding == 0


async def test_a_waiter_cancelled_in_the_turn_it_was_granted_gives_the_slot_back():
    s = GenerationScheduler()
    holder = await s.acquire(Rank.FIRST, "holder")
    waiter = asyncio.create_task(s.acquire(Rank.FIRST, "w"))
    after = asyncio.create_task(s.acquire(Rank.FIRST, "after"))
    await until(lambda: s.waiting == 2)
    s.release(holder)  # grants "w" ...
    waiter.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    s.release(await after)  # the slot was not lost with it
    assert s.holding == 0


async def test_a_speculation_confirmed_while_it_waits_goes_before_the_continuations():
    s = GenerationScheduler()
    holder = await s.acquire(Rank.CONTINUATION, "holder")
    confirmed = asyncio.Event()
    order: list[str] = []

    async def take(rank: Rank, label: str, event: asyncio.Event | None = None) -> None:
        slot = await s.acquire(rank, label, promote_on=event, promoted=Rank.FIRST)
        order.append(label)
        s.release(slot)

    tasks = [
        asyncio.create_task(take(Rank.CONTINUATION, "cont-1")),
        asyncio.create_task(take(Rank.SPECULATIVE, "spec", confirmed)),
        asyncio.create_task(take(Rank.CONTINUATION, "cont-2")),
    ]
    await until(lambda: s.waiting == 3)
    assert not s.outranked(holder)  # continuations and a speculation: the holder keeps its slice
    confirmed.set()  # the speculation's turn is confirmed while it waits
    await until(lambda: s.outranked(holder))  # now a first slice waits
    s.release(holder, yielded=True)
    await asyncio.gather(*tasks)
    assert order == ["spec", "cont-1", "cont-2"]
    assert [g.rank for g in s.granted][1] is Rank.FIRST
    await asyncio.sleep(0)  # the cancelled promotion watchers finish
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_speculation_unconfirmed_stays_last_and_its_watcher_goes_with_it():
    s = GenerationScheduler()
    holder = await s.acquire(Rank.CONTINUATION, "holder")
    spec = asyncio.create_task(s.acquire(Rank.SPECULATIVE, "spec", promote_on=asyncio.Event()))
    cont = asyncio.create_task(s.acquire(Rank.CONTINUATION, "cont"))
    await until(lambda: s.waiting == 2)
    s.release(holder)
    s.release(await cont)  # the continuation first: the speculation was never confirmed
    s.release(await spec)
    blocker = await s.acquire(Rank.FIRST, "blocker")
    gone = asyncio.create_task(s.acquire(Rank.SPECULATIVE, "gone", promote_on=asyncio.Event()))
    await until(lambda: s.waiting == 1)
    gone.cancel()  # a speculation discarded while it waits
    with pytest.raises(asyncio.CancelledError):
        await gone
    s.release(blocker)
    await asyncio.sleep(0)
    assert s.waiting == 0 and s.holding == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}


class FakeCompletions:
    """Stands in for ChatClient: streams `reply` as one-word tokens continuing the prompt's
    assistant text, each token after the test lets it go (`step`), and records every request."""

    def __init__(self, replies: dict[str, str], max_tokens: int = 100) -> None:
        self.replies = replies  # user text -> reply
        self.max_tokens = max_tokens
        self.read_timeout_s = 5.0
        self.requests: list[tuple[str, str, int]] = []  # (user, assistant text so far, max_tokens)
        self.open = 0
        self.open_streams = 0
        self.stats: dict[str, int] = {}

    def tokens(self, user: str) -> list[str]:
        words = self.replies[user].split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def stream_completion(self, prompt: str, max_tokens: int, stop=None):
        user = prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        so_far = prompt.split("<|im_start|>assistant\n")[-1]
        self.requests.append((user, so_far, max_tokens))
        tokens = self.tokens(user)
        done = 0
        while done < len(tokens) and so_far.startswith("".join(tokens[: done + 1])):
            done += 1
        rest = tokens[done:][:max_tokens]
        self.open += 1
        cut = len(tokens) - done > max_tokens
        try:
            for i, token in enumerate(rest):
                await asyncio.sleep(0)
                yield Delta(token, ("length" if cut else "stop") if i == len(rest) - 1 else None)
        finally:
            self.open -= 1


def messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]


LONG = " ".join(f"a{i}" for i in range(40))


async def test_a_new_turns_first_slice_preempts_a_long_reply_which_then_continues_where_it_stopped():
    client = FakeCompletions({"long": LONG, "short": "b0 b1 b2 b3"})
    chat = SlicedChat(client, first_slice_tokens=3, slice_tokens=0)
    events: list[str] = []
    got_a: list[str] = []
    b_task: asyncio.Task | None = None

    async def consume(user: str, into: list[str]) -> None:
        async with contextlib.aclosing(chat.stream_chat(messages(user))) as stream:
            async for delta in stream:
                into.append(delta)
                events.append(delta.strip())

    async def run_a() -> None:
        nonlocal b_task
        async with contextlib.aclosing(chat.stream_chat(messages("long"))) as stream:
            async for delta in stream:
                got_a.append(delta)
                events.append(delta.strip())
                if len(got_a) == 10:  # well past its first slice: the second conversation asks now
                    b_task = asyncio.create_task(consume("short", []))
                    await until(lambda: chat.scheduler.waiting == 1)

    await run_a()
    await b_task
    assert "".join(got_a) == LONG  # continued where it stopped: nothing lost, nothing repeated
    assert events[:10] == [f"a{i}" for i in range(10)]  # it stopped at the first token after the newcomer came
    assert events[10:13] == ["b0", "b1", "b2"]  # the newcomer's first slice went before the rest
    assert sorted(events[13:]) == sorted([f"a{i}" for i in range(10, 40)] + ["b3"])
    requests = [(u, len(so_far.split()), asked) for u, so_far, asked in client.requests]
    assert requests[:4] == [
        ("long", 0, 3),  # the first slice
        ("long", 3, 97),  # the rest (LLM_SLICE_TOKENS 0), stopped for the newcomer
        ("short", 0, 3),  # the newcomer's first slice
        ("long", 10, 90),  # the long reply's rest: it waited longer than the newcomer's rest
    ]
    assert chat.scheduler.preemptions == 1 and chat.scheduler.holding == 0


async def test_long_replies_take_turns_slice_by_slice_and_a_lone_reply_is_never_stopped():
    client = FakeCompletions({"x": LONG, "y": LONG.replace("a", "y")})
    chat = SlicedChat(client, first_slice_tokens=3, slice_tokens=8)
    alone = [d async for d in chat.stream_chat(messages("x"))]
    assert "".join(alone) == LONG
    assert [asked for _, _, asked in client.requests] == [3, 8, 8, 8, 8, 8]  # 40 tokens: 3 + 37 in slices
    assert chat.scheduler.preemptions == 0
    client.requests.clear()
    results = await asyncio.gather(*(collect(chat, u) for u in ("x", "y")))
    assert results == [LONG, LONG.replace("a", "y")]
    users = [u for u, _, _ in client.requests]
    assert users[:6] == ["x", "y", "x", "y", "x", "y"]  # alternating slices, not one reply after the other


async def collect(chat: SlicedChat, user: str) -> str:
    async with contextlib.aclosing(chat.stream_chat(messages(user))) as stream:
        return "".join([d async for d in stream])


async def test_speculative_replies_yield_to_confirmed_ones_at_once():
    client = FakeCompletions({"spec": LONG, "real": "r0 r1"})
    chat = SlicedChat(client, first_slice_tokens=3, slice_tokens=0)
    events: list[str] = []

    async def speculative() -> None:
        async with contextlib.aclosing(chat.stream_chat(messages("spec"), confirmed=asyncio.Event())) as stream:
            async for delta in stream:
                events.append(delta.strip())
                if len(events) == 1:
                    confirmed_task.append(asyncio.create_task(confirmed()))
                    await until(lambda: chat.scheduler.waiting == 1)

    async def confirmed() -> None:
        async for delta in chat.stream_chat(messages("real")):
            events.append(delta.strip())

    confirmed_task: list[asyncio.Task] = []
    await speculative()
    await confirmed_task[0]
    assert events[:4] == ["a0", "r0", "r1", "a1"]  # within its first slice, still it gave way


async def consume_with(chat: SlicedChat, user: str, events: list[str], on_token=None, confirmed=None) -> None:
    """Stream `user`'s reply into `events`, calling `on_token(n)` after its n-th token."""
    n = 0
    async with contextlib.aclosing(chat.stream_chat(messages(user), confirmed=confirmed)) as stream:
        async for delta in stream:
            events.append(delta.strip())
            n += 1
            if on_token is not None:
                await on_token(n)


async def test_a_speculation_confirmed_in_its_first_slice_finishes_it_before_another_first_slice():
    client = FakeCompletions({"spec": LONG, "new": LONG.replace("a", "n")})
    chat = SlicedChat(client, first_slice_tokens=5, slice_tokens=0)
    confirmed = asyncio.Event()
    events: list[str] = []
    later: list[asyncio.Task] = []

    async def spec_token(n: int) -> None:
        if n == 1:
            confirmed.set()  # its turn is confirmed: it is a first slice now, like the newcomer's
            later.append(asyncio.create_task(consume_with(chat, "new", events)))
            await until(lambda: chat.scheduler.waiting == 1)

    await consume_with(chat, "spec", events, spec_token, confirmed)
    await asyncio.gather(*later)
    assert events[:8] == ["a0", "a1", "a2", "a3", "a4", "n0", "n1", "n2"]  # not stopped for the newcomer
    assert chat.scheduler.preemptions == 0  # its first slice ended by itself; its rest waited for the newcomer's
    assert [(u, asked) for u, _, asked in client.requests][:4] == [("spec", 5), ("new", 5), ("spec", 95), ("new", 95)]


async def test_a_speculation_stopped_in_its_first_slice_and_confirmed_goes_before_continuations():
    """Stopped at its second token for a confirmed turn, it waits as a speculation behind that
    reply's continuation until its own turn is confirmed: then it goes first, for the rest of
    its first slice only."""
    client = FakeCompletions({"spec": LONG, "new": LONG.replace("a", "n")})
    chat = SlicedChat(client, first_slice_tokens=5, slice_tokens=0)
    confirmed = asyncio.Event()
    events: list[str] = []
    later: list[asyncio.Task] = []

    async def new_token(n: int) -> None:
        if n == 8:  # well into its continuation
            confirmed.set()

    async def spec_token(n: int) -> None:
        if n == 2:
            later.append(asyncio.create_task(consume_with(chat, "new", events, new_token)))
            await until(lambda: chat.scheduler.waiting == 1)

    await consume_with(chat, "spec", events, spec_token, confirmed)
    await asyncio.gather(*later)
    assert events[:10] == ["a0", "a1", *(f"n{i}" for i in range(8))]
    # promoted within a few tokens of the confirmation, not after the other reply's end
    at = events.index("a2")
    assert events[at : at + 3] == ["a2", "a3", "a4"] and at < events.index("n16")
    requests = [(u, len(so_far.split()), asked) for u, so_far, asked in client.requests]
    assert ("spec", 2, 3) in requests  # the rest of its first slice
    assert sorted(events) == sorted([f"a{i}" for i in range(40)] + [f"n{i}" for i in range(40)])
    assert chat.scheduler.holding == 0 and chat.scheduler.waiting == 0


async def test_closing_a_stream_early_or_cancelling_a_waiting_one_leaves_no_slot_task_or_request():
    client = FakeCompletions({"long": LONG, "other": LONG})
    chat = SlicedChat(client, first_slice_tokens=3, slice_tokens=0)
    stream = chat.stream_chat(messages("long"))
    assert await anext(stream) == "a0"
    waiting = asyncio.create_task(collect(chat, "other"))
    await until(lambda: chat.scheduler.waiting == 1)
    waiting.cancel()  # a waiting reply cancelled (a barge-in before it started)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert chat.scheduler.waiting == 0
    await stream.aclose()  # the orchestrator leaves the reply under way
    assert client.open == 0 and chat.scheduler.holding == 0 and chat.scheduler.waiting == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert await collect(chat, "other") == LONG  # the slot is free for the next reply
