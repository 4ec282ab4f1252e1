"""A reply generated in slices through the scheduler (scheduler.py), first pieces before the rest.

`SlicedChat.stream_chat(messages)` is the orchestrator's usual call (an async iterator of text
deltas; leaving it early closes the upstream request), but underneath a reply is a series of
`/v1/completions` requests on the ChatML prompt (chatml.py), each sent only while the reply holds
the scheduler's slot:

- the first request ranks `FIRST` and asks for `first_slice_tokens` tokens (about the first TTS
  piece); each later one ranks `CONTINUATION`, carries the prompt plus the text streamed so far
  and asks for `slice_tokens` more (0: the rest of the budget). Between two slices the reply waits
  again for its turn, so long replies take turns (round-robin) and a new turn's first slice goes
  before all of them;
- a request whose rank is beaten by a waiter (a continuation, or speculative work, when a
  confirmed turn's first slice waits) stops at its next token: the upstream response is closed,
  which the server notices at its next token.

With nobody waiting the slices follow each other at once, each costing an HTTP request; the
previous slice left its tokens in the KV cache.

Slices are cheap on the embedded server (voicepipe/llm_server): it keeps each conversation's KV
sequence, so a continuation evaluates only the tokens after its previous slice, and a new turn only
its new messages, whatever other conversations ran in between. On a server with one KV cache
(llama-cpp-python's, used before) each of them evaluated its whole prompt again after another
conversation's slice: 1.8-3.7 s before the first token at four conversations of six turns
(docs/PERFORMANCE.md). Why slices at all when that server batches: on a few CPU cores a batch of
four tokens costs nearly four times one (measured: 7.8 ms a step for one sequence, 23 ms for
four), so generating everything at once delays each new turn's first piece by every other reply
under way; one at a time, the first piece goes first.

The continued text is the model's own continuation of what was streamed, but not always word for
word the same as one uninterrupted request at temperature 0: the streamed text is tokenized again
(to the same tokens, checked) and evaluated as a batch, whose floating-point results may tip a
close choice. Whether the server supports this is not detected: the chat template cannot be read
through the OpenAI API, and a server on many cores or a GPU, where a batch costs little more than
one request, would only be slowed by one-at-a-time slices.

This needs the completions endpoint and the model's chat template on the client, so it is a
setting (`LLM_SCHEDULING`) that `voicepipe up` turns on for its embedded SmolLM2 server; a generic
OpenAI-compatible server (OpenAI, vLLM, Ollama) batches concurrent requests itself, has its own
template, and keeps the plain chat stream."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from shared.config import Settings
from workers.llm_orchestrator import chatml
from workers.llm_orchestrator.llm_client import ChatClient, LlmTimeout
from workers.llm_orchestrator.scheduler import GenerationScheduler, Rank, Slot

log = logging.getLogger("voicepipe.llm")


def scheduled(client: ChatClient, settings: Settings) -> ChatClient | SlicedChat:
    """The client an orchestrator streams replies through: in slices when LLM_SCHEDULING is on."""
    if not settings.llm_scheduling:
        return client
    return SlicedChat(client, first_slice_tokens=settings.llm_first_slice_tokens, slice_tokens=settings.llm_slice_tokens)


class SlicedChat:
    """The ChatClient interface the orchestrator uses, with replies scheduled slice by slice."""

    def __init__(
        self,
        client: ChatClient,
        scheduler: GenerationScheduler | None = None,
        *,
        first_slice_tokens: int = 8,
        slice_tokens: int = 32,
    ) -> None:
        self.client = client
        self.scheduler = scheduler or GenerationScheduler()
        self.first_slice_tokens = first_slice_tokens
        self.slice_tokens = slice_tokens  # tokens asked by a continuation (0: the rest of the budget)
        self._replies = 0

    # ---- what the orchestrator calls
    async def stream_chat(
        self, messages: list[dict[str, str]], *, confirmed: asyncio.Event | None = None
    ) -> AsyncIterator[str]:
        """Yield the reply's text deltas; raises LlmFailure. Use under `contextlib.aclosing`.
        `confirmed`: None for a confirmed turn; for a speculation, the event set when its turn is
        confirmed. Until then the reply ranks below every confirmed one; from then on it ranks as
        a confirmed reply, in the queue at once and at its next token while it generates."""
        self._replies += 1
        label = f"reply-{self._replies}"
        budget = self.client.max_tokens
        streamed: list[str] = []
        tokens = 0

        def confirmed_rank() -> Rank:
            return Rank.FIRST if tokens < self.first_slice_tokens else Rank.CONTINUATION

        def rank_now() -> Rank:
            return Rank.SPECULATIVE if confirmed is not None and not confirmed.is_set() else confirmed_rank()

        slot: Slot | None = None
        yielded = False
        try:
            while tokens < budget:
                # the previous slice's slot is given back only once this slice is queued (scheduler.py)
                asked_at = time.perf_counter()
                rank = rank_now()
                slot = await self._acquire(rank, label, confirmed, confirmed_rank(), slot, yielded)
                granted_at = time.perf_counter()
                first_at: float | None = None
                yielded = False
                finish: str | None = None
                in_request = 0
                remaining = budget - tokens
                # the first slice ends where the first piece should; a speculation stopped inside it
                # and confirmed since asks only for the rest of it (at FIRST rank)
                first_left = self.first_slice_tokens - tokens
                asked = min(remaining, first_left if first_left > 0 else (self.slice_tokens or remaining))
                completion = self.client.stream_completion(chatml.prompt(messages, "".join(streamed)), asked, chatml.STOP)
                async with contextlib.aclosing(completion) as deltas:
                    async for delta in deltas:
                        finish = delta.finish_reason or finish
                        if delta.text:
                            first_at = first_at or time.perf_counter()
                            tokens += 1  # llama.cpp's server streams one token a chunk
                            in_request += 1
                            streamed.append(delta.text)
                            yield delta.text
                        slot.rank = rank_now()  # confirmed meanwhile, or its first slice done
                        if finish is None and self.scheduler.outranked(slot):
                            yielded = True
                            break  # leaving the block closes this request upstream
                log.debug(
                    "%s slice %s: waited %.0f ms, first token after %.0f ms, %d tokens in %.0f ms%s",
                    label, rank.name, (granted_at - asked_at) * 1000,
                    ((first_at or granted_at) - granted_at) * 1000, in_request,
                    (time.perf_counter() - granted_at) * 1000, ", stopped for another reply" if yielded else "",
                )
                if not yielded and (finish != "length" or asked >= remaining or not in_request):
                    return  # the model ended its reply, the budget is spent, or the server closed the stream
        finally:
            if slot is not None:
                self.scheduler.release(slot, yielded=yielded)

    async def _acquire(
        self, rank: Rank, label: str, confirmed: asyncio.Event | None, promoted: Rank, previous: Slot | None, yielded: bool
    ) -> Slot:
        """The slot, waited for at most the read timeout (as the server's own queue was); a
        speculation confirmed while it waits goes up to `promoted`; `previous` is given back."""
        if rank is not Rank.SPECULATIVE:
            confirmed = None
        try:
            async with asyncio.timeout(self.client.read_timeout_s):
                return await self.scheduler.acquire(
                    rank, label, promote_on=confirmed, promoted=promoted, after=previous, yielded=yielded
                )
        except TimeoutError:
            raise LlmTimeout(f"LLM server did not answer within {self.client.read_timeout_s} s") from None

    # ---- the rest of the client's interface, as it is
    @property
    def open_streams(self) -> int:
        return self.client.open_streams

    @property
    def stats(self) -> dict[str, int]:
        return self.client.stats

    async def check(self, timeout_s: float) -> None:
        await self.client.check(timeout_s)

    def pool_stats(self) -> dict[str, int]:
        return self.client.pool_stats()

    async def aclose(self) -> None:
        await self.client.aclose()
