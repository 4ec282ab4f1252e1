"""A deterministic OpenAI-compatible streaming chat server: a real HTTP server on a free port.

It records every request and when each stream started and ended, and whether the client went away
before the stream finished, so tests can prove the orchestrator closes upstream streams."""
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
    messages: list[dict]
    started: float
    ended: float | None = None
    completed: bool = False  # False when the client closed it early

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

    async def chat(self, request: Request):
        body = await request.json()
        if self.fail_status is not None:
            return PlainTextResponse("model exploded", status_code=self.fail_status)
        record = StreamRecord(messages=body["messages"], started=time.monotonic())
        self.streams.append(record)
        text = self.reply_for(body["messages"])

        async def events():
            try:
                words = text.split(" ")
                for i, word in enumerate(words):
                    if self.malformed and i == 2:
                        yield "data: {not json\n\n"
                        return
                    token = word if i == 0 else " " + word
                    chunk = {"choices": [{"index": 0, "delta": {"content": token}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(self.token_delay_s)
                yield "data: [DONE]\n\n"
                record.completed = True
            finally:
                record.ended = time.monotonic()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(self, request: Request):
        return JSONResponse({"data": [{"id": "fake"}]})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]), Route("/v1/models", self.models)])


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
