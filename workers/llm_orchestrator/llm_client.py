"""OpenAI-compatible streaming chat over one pooled HTTP client per process.

Covers llama.cpp server, Ollama, vLLM and OpenAI. Why it is more than `httpx.stream`:

- A reply the caller stops wanting (barge-in, disconnect, cancellation) must stop the generation
  upstream. OpenAI-compatible servers only notice that their client left when the TCP connection
  closes, so every early exit closes the response unread, which makes httpx drop the connection
  instead of returning it to the pool; the close is shielded so a repeated cancellation cannot
  leave the socket open. A stream read to its end returns its connection to the pool instead.
- Local servers restart and hosted ones shed load: a refused or reset connect and HTTP 429/502/503
  are retried with jittered backoff, but only before the first token, since nothing the caller
  has already spoken can be taken back.
- Errors become three exceptions whose message is safe to show a client: the server's error body
  can carry prompts, paths or keys, so it is only logged (shortened). A malformed stream chunk is
  reply text: it is logged only with content logging on (`log_content`), else at DEBUG."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from shared.logging import log_content

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger("voicepipe.llm")

RETRY_STATUSES = frozenset({429, 502, 503})  # the server is there but busy or restarting
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRY_AFTER_MAX_S = 2.0  # a longer Retry-After is cut to this: a voice reply cannot wait longer
DRAIN_TIMEOUT_S = 1.0  # after [DONE], how long the rest of the body may take before the connection is dropped
DETAIL_CHARS = 200  # of a server's error body, in the log only
ERROR_BODY_MAX_BYTES = 65536  # an error body longer than this is not read on to keep its connection


class Delta(NamedTuple):
    """One streamed chunk: its text (may be empty) and, on the last, why generation ended."""

    text: str
    finish_reason: str | None = None


class LlmFailure(Exception):
    """The reply failed; `str(exc)` is safe to show a client, `code` is the protocol error code."""

    code = "llm_error"


class LlmUnavailable(LlmFailure):
    """Unreachable, refused, HTTP 429/5xx after the retries, or the connection dropped mid-stream."""

    code = "llm_unavailable"


class LlmTimeout(LlmFailure):
    """No connection, or no next bytes of the reply, within the configured timeout."""

    code = "llm_timeout"


class LlmError(LlmFailure):
    """A malformed stream, an error object in the stream, or an HTTP 4xx other than 429."""

    code = "llm_error"


class _Retry(Exception):
    """An attempt failed in a way worth another try (before the first token only)."""

    def __init__(self, failure: LlmFailure, detail: str, delay_s: float | None = None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.detail = detail  # for the log only
        self.delay_s = delay_s  # from Retry-After; None: the backoff


class _Upstream:
    """One open upstream response; closed exactly once, however the stream ends."""

    __slots__ = ("client", "response", "finished", "closed")

    def __init__(self, client: ChatClient, response: httpx.Response) -> None:
        self.client = client
        self.response = response
        self.finished = False  # the server ended the reply ([DONE] or the end of the body)
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            log.debug("LLM response %s already closed", id(self.response))
            return
        self.closed = True
        client = self.client
        client.open_streams -= 1
        client._upstreams.discard(self)
        if not self.finished:
            client.stats["closed_early"] += 1
        # Unread, httpx closes the connection rather than pooling it, so the server sees its client
        # leave. The close runs in a task of its own: the caller may be cancelled again while we
        # wait (stop_tasks cancels repeatedly) and that must not interrupt it half way.
        task = asyncio.create_task(self.response.aclose(), name="llm-response-close")
        client._closing.add(task)
        task.add_done_callback(client._closing.discard)
        await asyncio.shield(task)


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        pool_size: int = 100,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        max_tokens: int = 160,
        temperature: float = 0.6,
        log_content: bool = False,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_connections = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            # read covers the first token and every gap between tokens (a stalled server);
            # pool is the wait for a free connection when all pool_size are busy
            timeout=httpx.Timeout(
                connect=connect_timeout_s, read=read_timeout_s, write=connect_timeout_s, pool=connect_timeout_s
            ),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=min(20, pool_size)),
        )
        # its own single connection: a readiness check never takes one from the replies nor shows
        # in their pool figures
        self._probe_http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, limits=httpx.Limits(max_connections=1)
        )
        self._model = model
        self._log_content = log_content
        self.max_tokens = max_tokens
        self._temperature = temperature
        self._upstreams: set[_Upstream] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.open_streams = 0  # upstream responses open now
        # requests: streams asked for (chat or completions); retries: extra attempts; failures: LlmFailure raised;
        # closed_early: responses closed before the server finished; connects: TCP connections made
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0, "closed_early": 0, "connects": 0}

    @classmethod
    def from_settings(cls, s: Settings, base_url: str | None = None, model: str | None = None) -> ChatClient:
        """The orchestrator's client: every option from the settings (`base_url` and `model`, when
        given, instead of theirs)."""
        return cls(
            base_url or s.llm_base_url,
            model or s.llm_model,
            api_key=s.llm_api_key,
            connect_timeout_s=s.llm_connect_timeout_s,
            read_timeout_s=s.llm_read_timeout_s,
            pool_size=s.llm_pool_size,
            retries=s.llm_retries,
            retry_backoff_s=s.llm_retry_backoff_s,
            max_tokens=s.llm_max_tokens,
            temperature=s.llm_temperature,
            log_content=s.log_content,
        )

    async def stream_chat(
        self, messages: list[dict[str, str]], *, confirmed: asyncio.Event | None = None
    ) -> AsyncIterator[str]:
        """Yield the reply's content deltas; raises LlmFailure. Use under `contextlib.aclosing`.

        `confirmed` (set when the turn of a reply started speculatively is confirmed) only matters
        where replies are scheduled (slices.py); a plain stream goes to the server at once either way."""
        body = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self._temperature,
        }
        async with contextlib.aclosing(self._stream("/chat/completions", body)) as deltas:  # an early exit closes it now
            async for delta in deltas:
                if delta.text:
                    yield delta.text

    async def stream_completion(
        self, prompt: str, max_tokens: int, stop: list[str] | None = None
    ) -> AsyncIterator[Delta]:
        """`/v1/completions` of a raw prompt: yield each chunk's text with its `finish_reason`
        ("stop", "length", or None until the last); raises LlmFailure. Use under `contextlib.aclosing`."""
        body: dict[str, Any] = {
            "model": self._model,
            "prompt": prompt,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": self._temperature,
        }
        if stop:
            body["stop"] = stop
        async with contextlib.aclosing(self._stream("/completions", body)) as deltas:
            async for delta in deltas:
                yield delta

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Delta]:
        self.stats["requests"] += 1
        try:
            upstream = await self._open(path, body)
            try:
                async with contextlib.aclosing(upstream.response.aiter_lines()) as lines:
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue  # blank separators, comments (": ping") and other SSE fields
                        data = line[5:].strip()
                        if data == "[DONE]":
                            upstream.finished = True
                            await self._drain(lines)
                            break
                        for delta in self._parse(data):
                            yield delta
                    else:
                        upstream.finished = True  # the body ended without [DONE]: some servers do that
            except httpx.HTTPError as exc:
                raise self._failure(exc, answered=True) from exc
            finally:
                await upstream.close()  # every exit: the end, an error, break, cancellation
        except LlmFailure:
            self.stats["failures"] += 1
            raise

    async def check(self, timeout_s: float) -> None:
        """Return when the server answers `GET /models` with a 2xx within `timeout_s` (readiness).

        Raises LlmTimeout when it took the connection but did not answer in time (busy, or hung),
        LlmUnavailable when it could not be reached or answered an error."""
        try:
            response = await self._probe_http.get("/models", timeout=timeout_s)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
            raise LlmTimeout("LLM server did not list its models in time") from exc
        except httpx.HTTPError as exc:  # refused, reset, a connect timeout, a bad URL
            raise LlmUnavailable("LLM server is unreachable") from exc
        if not response.is_success:
            raise LlmUnavailable(f"LLM server answered HTTP {response.status_code}")

    async def _open(self, path: str, body: dict[str, Any]) -> _Upstream:
        """Send the request until a 2xx answer, retrying what is worth it; nothing is yielded yet."""
        attempt = 0
        while True:
            try:
                return await self._attempt(path, body)
            except _Retry as retry:
                if attempt >= self.retries:
                    log.warning("LLM request failed after %d retries: %s", attempt, retry.detail)
                    raise retry.failure from retry.__cause__
                backoff = self.retry_backoff_s * 2**attempt * random.uniform(0.5, 1.5)
                delay = backoff if retry.delay_s is None else retry.delay_s
                attempt += 1
                self.stats["retries"] += 1
                log.info("LLM request failed (%s); retry %d of %d in %.2f s", retry.detail, attempt, self.retries, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, path: str, body: dict[str, Any]) -> _Upstream:
        request = self._http.build_request("POST", path, json=body, extensions={"trace": self._trace})
        try:
            response = await self._http.send(request, stream=True)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # refused, or reset before any answer (a kept-alive connection the server had closed too)
            raise _Retry(LlmUnavailable("LLM server is unreachable"), repr(exc)) from exc
        except httpx.HTTPError as exc:  # timeouts among them: not retried, they have already waited
            raise self._failure(exc, answered=False) from exc
        upstream = _Upstream(self, response)
        self.open_streams += 1
        self._upstreams.add(upstream)
        if response.is_success:
            return upstream
        try:
            detail = await self._error_detail(upstream)
        finally:
            await upstream.close()
        status = response.status_code
        message = f"LLM server answered HTTP {status}"
        if status in RETRY_STATUSES:
            retry_after = self._retry_after(response) if status in RETRY_AFTER_STATUSES else None
            raise _Retry(LlmUnavailable(message), f"HTTP {status}: {detail}", retry_after)
        log.warning("LLM server answered HTTP %d: %s", status, detail)
        if status >= 500:
            raise LlmUnavailable(message)
        raise LlmError(message)  # 4xx (a wrong model, URL or key), or a redirect httpx does not follow

    async def _drain(self, lines: AsyncIterator[str]) -> None:
        """Read the rest of the body after [DONE], so the connection goes back to the pool."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                async for _ in lines:
                    pass
        except (TimeoutError, httpx.HTTPError) as exc:  # the reply is whole; only the connection is lost
            log.debug("LLM body after [DONE] not read to its end: %r", exc)

    def _parse(self, data: str) -> list[Delta]:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            log_content(log, self._log_content, "LLM sent a malformed chunk", content=data[:DETAIL_CHARS], level=logging.WARNING)
            raise LlmError("LLM server sent a malformed stream") from exc
        if not isinstance(chunk, dict):
            log_content(log, self._log_content, "LLM sent a chunk that is not an object", content=data[:DETAIL_CHARS], level=logging.WARNING)
            raise LlmError("LLM server sent a malformed stream")
        if "error" in chunk:
            log.warning("LLM sent an error in the stream: %.200s", json.dumps(chunk["error"]))
            raise LlmError("LLM server reported an error")
        deltas = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else choice.get("text")  # chat, or completions
            finish = choice.get("finish_reason")
            text = content if isinstance(content, str) else ""
            if text or isinstance(finish, str):
                deltas.append(Delta(text, finish if isinstance(finish, str) else None))
        return deltas

    def _failure(self, exc: httpx.HTTPError, *, answered: bool) -> LlmFailure:
        """The client-safe failure for an httpx error (the detail goes to the log)."""
        log.warning("LLM request failed %s: %r", "mid-stream" if answered else "before an answer", exc)
        if isinstance(exc, httpx.ConnectTimeout):
            return LlmTimeout(f"LLM server did not accept a connection within {self.connect_timeout_s} s")
        if isinstance(exc, httpx.PoolTimeout):
            return LlmTimeout(f"no free connection to the LLM server within {self.connect_timeout_s} s")
        if isinstance(exc, httpx.TimeoutException):  # read (a stalled server) or write
            return LlmTimeout(f"LLM server did not answer within {self.read_timeout_s} s")
        if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
            if answered:
                return LlmUnavailable("LLM server dropped the connection mid-stream")
            return LlmUnavailable("LLM server is unreachable")
        return LlmError("LLM request failed")

    async def _error_detail(self, upstream: _Upstream) -> str:
        """The start of an error body, for the log; a short body is read to the end to keep the connection."""
        body = b""
        try:
            async for chunk in upstream.response.aiter_bytes():
                body += chunk
                if len(body) > ERROR_BODY_MAX_BYTES:
                    break
            else:
                upstream.finished = True
        except httpx.HTTPError as exc:
            return f"(body unreadable: {exc!r})"
        return body[:DETAIL_CHARS].decode(errors="replace")

    @staticmethod
    def _retry_after(response: httpx.Response) -> float | None:
        """Retry-After in seconds (an HTTP date is ignored), capped at RETRY_AFTER_MAX_S."""
        try:
            seconds = float(response.headers.get("retry-after", ""))
        except ValueError:
            return None
        if seconds != seconds or seconds < 0:  # NaN or negative
            return None
        return min(seconds, RETRY_AFTER_MAX_S)

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: counts new TCP connections (kept-alive reuse makes none)."""
        if event == "connection.connect_tcp.complete":
            self.stats["connects"] += 1

    def pool_stats(self) -> dict[str, int]:
        pool = getattr(getattr(self._http, "_transport", None), "_pool", None)
        connections = list(getattr(pool, "connections", []) or [])
        in_use = sum(1 for c in connections if not c.is_idle())
        return {
            "max_connections": self.max_connections,
            "in_use": in_use,
            "available": self.max_connections - in_use,
            "created": len(connections),  # held now, idle or not (as the Redis pool reports it)
        }

    async def aclose(self) -> None:
        """Close every response still open, then the pool; safe to call twice."""
        for upstream in list(self._upstreams):
            await upstream.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._http.aclose()
        await self._probe_http.aclose()
