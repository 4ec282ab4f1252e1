"""A reply generated in slices through the scheduler (scheduler.py), for a one-at-a-time server.

`SlicedChat.stream_chat(messages)` is the orchestrator's usual call (an async iterator of text
deltas; leaving it early closes the upstream request), but underneath a reply is a series of
`/v1/completions` requests on the ChatML prompt (chatml.py), each sent only while the reply holds
the scheduler's slot:

- the first request ranks `FIRST`; once it has streamed `first_slice_tokens` tokens (about the
  first TTS piece) it ranks as a continuation;
- a request whose rank is beaten by a waiter stops at its next token (the upstream response is
  closed, which llama.cpp's server notices at its next token) and the reply waits again; when its
  turn comes a continuation request carries the prompt plus the text streamed so far and asks for
  the rest of the token budget. With nobody waiting the first request simply runs to the end: a
  lone conversation pays nothing for this;
- a request that has streamed `slice_tokens` tokens also gives way to a waiting continuation of
  another reply, so long replies take turns (round-robin) instead of a preempted one waiting for
  the whole of the reply that preempted it while its own audio runs out (0: never).

A continuation re-processes its prompt: llama.cpp reuses its KV cache only for the longest common
prefix with the previous request, which after another conversation's slice is the shared system
prompt. On SmolLM2-135M that costs 30-90 ms for a few hundred tokens of prompt, once per
preemption, against the whole reply (up to LLM_MAX_TOKENS 160 tokens, ~1.5 s) a new question used
to wait for. The continued text is the model's own continuation of what was streamed, but not
always token for token the same as one uninterrupted request at temperature 0: the streamed text
is tokenized again and evaluated as a batch, whose floating-point results may tip a close choice.

This needs the completions endpoint and the model's chat template on the client, so it is a
setting (`LLM_SCHEDULING`) that `voicepipe up` turns on for its embedded SmolLM2 server; a generic
OpenAI-compatible server (OpenAI, vLLM, Ollama) batches concurrent requests itself, has its own
template, and keeps the plain chat stream."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from shared.config import Settings
from workers.llm_orchestrator import chatml
from workers.llm_orchestrator.llm_client import ChatClient, LlmTimeout
from workers.llm_orchestrator.scheduler import GenerationScheduler, Rank

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
        first_slice_tokens: int = 16,
        slice_tokens: int = 48,
    ) -> None:
        self.client = client
        self.scheduler = scheduler or GenerationScheduler()
        self.first_slice_tokens = first_slice_tokens
        self.slice_tokens = slice_tokens  # 0: a request runs until the reply ends or it is outranked
        self._replies = 0

    # ---- what the orchestrator calls
    async def stream_chat(self, messages: list[dict[str, str]], *, speculative: bool = False) -> AsyncIterator[str]:
        """Yield the reply's text deltas; raises LlmFailure. Use under `contextlib.aclosing`."""
        self._replies += 1
        label = f"reply-{self._replies}"
        rank = Rank.SPECULATIVE if speculative else Rank.FIRST
        budget = self.client.max_tokens
        streamed: list[str] = []
        tokens = 0
        while tokens < budget:
            slot = await self._acquire(rank, label)
            yielded = False
            finish: str | None = None
            try:
                completion = self.client.stream_completion(
                    chatml.prompt(messages, "".join(streamed)), budget - tokens, chatml.STOP
                )
                in_request = 0
                async with contextlib.aclosing(completion) as deltas:
                    async for delta in deltas:
                        finish = delta.finish_reason or finish
                        if delta.text:
                            tokens += 1  # llama.cpp's server streams one token a chunk
                            in_request += 1
                            streamed.append(delta.text)
                            yield delta.text
                        if rank is Rank.FIRST and tokens >= self.first_slice_tokens:
                            rank = slot.rank = Rank.CONTINUATION
                        if finish is None and self._give_way(slot, in_request):
                            yielded = True
                            break  # leaving the block closes this request upstream
            finally:
                self.scheduler.release(slot, yielded=yielded)
            if not yielded:
                return  # the model ended its reply, the budget is spent, or the server closed the stream
            log.debug("%s stopped after %d tokens for another reply", label, tokens)
            rank = Rank.SPECULATIVE if speculative else Rank.CONTINUATION

    def _give_way(self, slot, in_request: int) -> bool:
        if self.scheduler.outranked(slot):
            return True
        return 0 < self.slice_tokens <= in_request and self.scheduler.contended(slot)

    async def _acquire(self, rank: Rank, label: str):
        """The slot, waited for at most the read timeout (as the server's own queue was)."""
        try:
            async with asyncio.timeout(self.client.read_timeout_s):
                return await self.scheduler.acquire(rank, label)
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
