"""Null models, for measuring the gateway and the bus without the models (setting `NULL_MODE`,
never the default): each stage consumes its input the usual way and answers at once.

The VAD stays real (it costs microseconds a frame), so turns start and end on real speech; the
transcript, the reply and its audio are fixed and instant."""
from __future__ import annotations

from collections.abc import AsyncIterator

NULL_TRANSCRIPT = "what time is it"
NULL_REPLY = "It is time for a test. This reply costs nothing to make."


class NullTranscriber:
    def transcribe(self, pcm: bytes) -> str:
        return NULL_TRANSCRIPT

    def warm_up(self) -> None:
        pass


class NullVoice:
    """Silence as long as the piece would take to speak (about 60 ms a character)."""

    sample_rate = 22050

    def synthesize(self, text: str) -> bytes:
        return bytes(self.sample_rate * 2 * 60 * len(text) // 1000)

    def warm_up(self) -> None:
        pass


class NullChat:
    """Streams `NULL_REPLY` word by word, at once."""

    max_connections = 0

    def __init__(self) -> None:
        self.open_streams = 0
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0, "closed_early": 0, "connects": 0}

    async def stream_chat(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        self.stats["requests"] += 1
        for i, word in enumerate(NULL_REPLY.split(" ")):
            yield word if i == 0 else " " + word

    def pool_stats(self) -> dict[str, int]:
        return {"max_connections": 0, "in_use": 0, "available": 0, "created": 0}

    async def aclose(self) -> None:
        pass
