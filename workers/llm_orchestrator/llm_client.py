"""OpenAI-compatible streaming chat over one pooled HTTP client per process.

Covers llama.cpp server, Ollama, vLLM and OpenAI. Leaving the `stream_chat` iterator early
(cancellation included) closes the HTTP connection at once, so the server stops generating; a
stream read to its end returns its connection to the pool for the next turn."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


class LlmUnavailable(Exception):
    """The LLM could not be reached or failed; the message is safe to show to the client."""


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_tokens: int = 160,
        temperature: float = 0.6,
        max_connections: int = 100,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_connections = max_connections
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
        )
        self._model = model
        self._max_tokens = max_tokens
        self._temperature = temperature

    async def stream_chat(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        body = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "max_tokens": self._max_tokens,
            "temperature": self._temperature,
        }
        try:
            async with self._http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    detail = (await response.aread())[:200].decode(errors="replace")
                    raise LlmUnavailable(f"LLM answered HTTP {response.status_code}: {detail}")
                done = False
                async for line in response.aiter_lines():
                    if done or not line.startswith("data:"):
                        continue  # read to the end of the body, so the connection is kept for reuse
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise LlmUnavailable("LLM sent a malformed stream chunk") from exc
                    if "error" in chunk:
                        raise LlmUnavailable(f"LLM error: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            yield content
        except httpx.HTTPError as exc:
            raise LlmUnavailable(f"LLM unreachable: {type(exc).__name__}: {exc}") from exc

    def pool_stats(self) -> dict[str, int]:
        pool = getattr(getattr(self._http, "_transport", None), "_pool", None)
        connections = list(getattr(pool, "connections", []) or [])
        idle = sum(1 for c in connections if c.is_idle())
        return {
            "max_connections": self.max_connections,
            "in_use": len(connections) - idle,
            "available": self.max_connections - (len(connections) - idle),
            "created": len(connections),
        }

    async def aclose(self) -> None:
        await self._http.aclose()
