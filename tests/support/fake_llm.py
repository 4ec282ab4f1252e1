"""A deterministic OpenAI-compatible streaming chat server: a real HTTP server on a free port.

It records every request and when each stream started and ended, and whether the client went away
before the stream finished, so tests can prove the orchestrator closes upstream streams. It can
also misbehave the ways real servers do (an error status for the first requests, a stall, a broken
chunk, a connection dropped mid-stream) so the client's retries and timeouts meet the real thing.

A stream notices its client leaving by itself, whatever starlette does about disconnects (it stops
listening for them under ASGI spec 2.4): otherwise a stream sleeping between tokens, or stalled,
would only end at its next write, and `ended` would measure the fake, not the client."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from voicepipe.embedded import free_port


@dataclass
class StreamRecord:
    messages: list[dict]  # chat requests; a completions request has its raw `prompt` instead
    started: float
    ended: float | None = None
    completed: bool = False  # False when the client closed it early
    tokens_sent: int = 0
    last_token_at: float | None = None  # time.monotonic() when the last token was written
    client_port: int | None = None  # the client's TCP port: the same for streams on a kept-alive connection
    prompt: str | None = None  # /v1/completions only
    max_tokens: int | None = None

    async def wait_ended(self, timeout: float = 2.0, poll_s: float = 0.005) -> float:
        """Wait until the stream has ended; returns when (time.monotonic())."""
        async with asyncio.timeout(timeout):
            while self.ended is None:
                await asyncio.sleep(poll_s)
        return self.ended


@dataclass
class FakeLlm:
    reply: str = "Paris is the capital of France. It is known for the Eiffel Tower."
    token_delay_s: float = 0.005
    fail_status: int | None = None  # answer this HTTP status instead of a stream
    malformed: bool = False  # send a broken chunk mid-stream
    echo: bool = False  # reply with the user's last message and the history length
    tokens: list[str] | None = None  # stream exactly these content deltas (overrides reply and echo)
    stall_after: int | None = None  # after this many tokens, send nothing more until the client leaves
    drop_after: int | None = None  # after this many tokens, drop the connection (no [DONE], no end of body)
    fail_first: int = 0  # the first N requests answer fail_first_status, the next ones stream
    fail_first_status: int = 503
    fail_retry_after: str | None = None  # a Retry-After header on those answers
    requests: int = 0  # every POST to /chat/completions, failed or not
    streams: list[StreamRecord] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reply_for(self, messages: list[dict]) -> str:
        if self.echo:
            users = [m["content"] for m in messages if m["role"] == "user"]
            return f"You said {users[-1]}. I remember {len(users) - 1} earlier questions."
        return self.reply

    def tokens_for(self, messages: list[dict]) -> list[str]:
        if self.tokens is not None:
            return list(self.tokens)
        words = self.reply_for(messages).split(" ")
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    async def chat(self, request: Request):
        self.requests += 1
        body = await request.json()
        if self.fail_status is not None:
            return PlainTextResponse("model exploded", status_code=self.fail_status)
        if self.requests <= self.fail_first:
            headers = {"Retry-After": self.fail_retry_after} if self.fail_retry_after is not None else None
            return PlainTextResponse("model overloaded", status_code=self.fail_first_status, headers=headers)
        client = request.client
        record = StreamRecord(
            messages=body["messages"], started=time.monotonic(), client_port=client.port if client else None
        )
        self.streams.append(record)
        tokens = self.tokens_for(body["messages"])
        return self._stream(request, record, [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in tokens])

    async def completions(self, request: Request):
        """`/v1/completions` on a ChatML prompt: the reply to its last user message (`reply_for`),
        continued from the assistant text the prompt already ends with; `max_tokens` honoured
        (`finish_reason: "length"`)."""
        self.requests += 1
        body = await request.json()
        prompt = body["prompt"]
        turns = prompt.split("<|im_start|>")
        messages = [
            {"role": t.split("\n", 1)[0], "content": t.split("\n", 1)[1].removesuffix("<|im_end|>\n")}
            for t in turns[1:-1]
        ]
        so_far = turns[-1].split("\n", 1)[1]
        tokens = self.tokens_for(messages)
        done, text = 0, ""
        for token in tokens:  # the tokens the prompt already ends with are not sent again
            if not so_far.startswith(text + token):
                break
            text, done = text + token, done + 1
        tokens = tokens[done:]
        max_tokens = body.get("max_tokens") or len(tokens)
        record = StreamRecord(messages=messages, started=time.monotonic(), prompt=prompt, max_tokens=max_tokens)
        self.streams.append(record)

        chunks = []
        for i, token in enumerate(tokens[:max_tokens]):
            last = i == min(len(tokens), max_tokens) - 1
            finish = None if not last else ("length" if max_tokens < len(tokens) else "stop")
            chunks.append({"choices": [{"index": 0, "text": token, "finish_reason": finish}]})
        return self._stream(request, record, chunks)

    def _stream(self, request: Request, record: StreamRecord, chunks: list[dict]) -> StreamingResponse:
        """`chunks` as server-sent events, `token_delay_s` apart, with the faults this fake is set to
        (`malformed`, `drop_after`, `stall_after`); `record` follows what was sent and when it ended."""

        async def events():
            gone = asyncio.Event()  # set when the client has left
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                for i, chunk in enumerate(chunks):
                    if self.malformed and i == 2:
                        yield "data: {not json\n\n"
                        return
                    if self.drop_after is not None and i == self.drop_after:
                        raise ConnectionAbortedError("fake LLM drops the connection")  # uvicorn closes it
                    if self.stall_after is not None and i == self.stall_after:
                        await _pause(None, gone)
                        return
                    yield f"data: {json.dumps(chunk)}\n\n"
                    record.tokens_sent += 1
                    record.last_token_at = time.monotonic()
                    if await _pause(self.token_delay_s, gone):
                        return
                if self.stall_after is not None and self.stall_after >= len(chunks):
                    await _pause(None, gone)
                    return
                yield "data: [DONE]\n\n"
                record.completed = True
            finally:
                watcher.cancel()
                record.ended = time.monotonic()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(self, request: Request):
        return JSONResponse({"data": [{"id": "fake"}]})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models),
            ]
        )


async def _watch_disconnect(request: Request, gone: asyncio.Event) -> None:
    """Set `gone` when the client disconnects (uvicorn answers every receive after the body that way).

    Safe next to starlette's own listener: uvicorn wakes every waiting receive on a disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _pause(seconds: float | None, gone: asyncio.Event) -> bool:
    """Sleep `seconds` (None: until the client leaves); True as soon as the client has left."""
    try:
        async with asyncio.timeout(seconds):
            await gone.wait()
    except TimeoutError:
        return False
    return True


class FakeLlmServer:
    """Runs a FakeLlm under uvicorn in a thread of its own, so it serves any test or process."""

    def __init__(self, llm: FakeLlm) -> None:
        self.llm = llm
        config = uvicorn.Config(llm.app(), host="127.0.0.1", port=llm.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-llm", daemon=True)

    def __enter__(self) -> FakeLlm:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake LLM server did not start")
            time.sleep(0.01)
        return self.llm

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
