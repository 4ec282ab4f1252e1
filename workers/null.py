"""Null models, for measuring the gateway and the bus without the models (setting `NULL_MODE`,
never the default): each stage consumes its input the usual way and answers with fixed output.

The VAD stays real (it costs microseconds a frame), so turns start and end on real speech; the
transcript, the reply and its audio are fixed. By default they are instant. `NULL_COMPUTE_MS` gives
every request a fixed compute time, one request at a time per process, as one loaded model serves
them (bench/scaling.py): the time is a wait, not busy CPU, so it models an engine on its own
hardware (a GPU, a remote server) and what it measures is how the pipeline spreads work over its
processes, not how many cores the benchmark machine has. Transcription and synthesis wait on the
thread the worker runs its model on (the fair scheduler's), as a real model blocks it; the chat
waits under a per-process lock, as an LLM engine serving one request at a time would."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

NULL_TRANSCRIPT = "what time is it"
NULL_REPLY = "It is time for a test. This reply costs nothing to make."


class NullTranscriber:
    def __init__(self, compute_s: float = 0.0) -> None:
        self.compute_s = compute_s

    def transcribe(self, pcm: bytes) -> str:
        if self.compute_s:
            time.sleep(self.compute_s)  # on the model's thread, never the event loop
        return NULL_TRANSCRIPT

    def warm_up(self) -> None:
        pass


class NullVoice:
    """Silence as long as the piece would take to speak (about 60 ms a character)."""

    sample_rate = 22050

    def __init__(self, compute_s: float = 0.0) -> None:
        self.compute_s = compute_s

    def synthesize(self, text: str) -> bytes:
        if self.compute_s:
            time.sleep(self.compute_s)  # on the model's thread, never the event loop
        return bytes(self.sample_rate * 2 * 60 * len(text) // 1000)

    def warm_up(self) -> None:
        pass


class NullChat:
    """Streams `NULL_REPLY` word by word, after `compute_s` (one request at a time)."""

    max_connections = 0

    def __init__(self, compute_s: float = 0.0) -> None:
        self.compute_s = compute_s
        self._engine = asyncio.Lock()
        self.open_streams = 0
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0, "closed_early": 0, "connects": 0}

    async def stream_chat(self, messages: list[dict[str, str]], *, confirmed: object = None) -> AsyncIterator[str]:
        self.stats["requests"] += 1
        if self.compute_s:
            async with self._engine:
                await asyncio.sleep(self.compute_s)
        for i, word in enumerate(NULL_REPLY.split(" ")):
            yield word if i == 0 else " " + word

    async def check(self, timeout_s: float) -> None:
        """Always answers (readiness)."""

    def pool_stats(self) -> dict[str, int]:
        return {"max_connections": 0, "in_use": 0, "available": 0, "created": 0}

    async def aclose(self) -> None:
        pass
