"""The OpenAI-compatible HTTP surface of the engine: `/v1/completions`, `/v1/chat/completions`
(streamed as server-sent events or whole), `/v1/models` and `/health`.

It speaks the subset voicepipe's orchestrator and an OpenAI SDK client use: the prompt or the
messages, max_tokens, temperature, top_p, seed, stop and stream (with
`stream_options.include_usage`), plus llama.cpp's top_k, min_p and repeat_penalty. Usage reports
`prompt_tokens_details.cached_tokens`: the prompt tokens found in the conversation's sequence and
not evaluated again. A client that goes away mid-stream cancels its request at the engine's next
step. The chat template is the model's own (`tokenizer.chat_template` in its GGUF), rendered by
llama-cpp-python's Jinja2 formatter."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from pydantic import BaseModel, ConfigDict, Field

from voicepipe.llm_server.engine import Delta, Engine, PromptRejected, Request, Sampling


class _Generation(BaseModel):
    """The generation fields both endpoints take; sampling defaults are the engine's (Sampling)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=Sampling.temperature, ge=0.0, le=2.0)
    top_p: float = Field(default=Sampling.top_p, ge=0.0, le=1.0)
    top_k: int = Field(default=Sampling.top_k, ge=0)
    min_p: float = Field(default=Sampling.min_p, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=Sampling.repeat_penalty, ge=0.0)
    frequency_penalty: float = Field(default=Sampling.frequency_penalty, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=Sampling.presence_penalty, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed,
        )

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stop if s)


class CompletionRequest(_Generation):
    prompt: str
    max_tokens: int | None = Field(default=16, ge=0)  # as OpenAI's and llama-cpp-python's default


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status_code=status)


def create_app(engine: Engine, alias: str, *, max_waiting: int = 64) -> FastAPI:
    app = FastAPI(title="voicepipe LLM server", docs_url=None, redoc_url=None)
    metadata = engine.model.metadata()
    template = metadata.get("tokenizer.chat_template")
    formatter = (
        Jinja2ChatFormatter(
            template,
            eos_token=engine.token_text(engine.model.token_eos()),
            bos_token=engine.token_text(engine.model.token_bos()),
        )
        if template
        else None
    )
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "requests_in_flight": engine.active, **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": alias, "object": "model", "created": created, "owned_by": "voicepipe"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _serve(body, engine.tokenize(body.prompt), body.stops(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        if formatter is None:
            return _error(400, "this model has no chat template; use /v1/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            formatted = formatter(messages=messages)
        except Exception as exc:  # the template rejects the conversation (roles out of order, say)
            return _error(400, f"the chat template rejected these messages: {exc}")
        stop = tuple(formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else [])
        return await _serve(body, engine.tokenize(formatted.prompt, add_bos=False), body.stops() + stop, chat=True)

    async def _serve(body: _Generation, prompt: list[int], stop: tuple[str, ...], *, chat: bool) -> Any:
        if engine.active >= max_waiting:
            return JSONResponse(
                {"error": {"message": "the LLM server is busy", "type": "server_error", "code": None}},
                status_code=503, headers={"Retry-After": "1"},
            )
        max_tokens = body.max_tokens if body.max_tokens is not None else engine.ctx_per_sequence
        request = Request(prompt=prompt, max_tokens=max_tokens, sampling=body.sampling(), stop=stop)
        if max_tokens == 0:  # nothing to generate: say so without queueing
            return _whole(body, request, [Delta("", "length")], chat)
        try:
            engine.submit(request)
        except PromptRejected as exc:
            return _error(400, str(exc))
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(body, request, chat, include_usage), media_type="text/event-stream")
        deltas = []
        try:
            while True:
                delta = await request.events.get()
                deltas.append(delta)
                if delta.finish_reason:
                    break
        finally:
            request.cancel()  # the client left (or we are done): the engine drops it at its next step
        if deltas[-1].error:
            return _error(500, deltas[-1].error, "server_error")
        return _whole(body, request, deltas, chat)

    async def _events(body: _Generation, request: Request, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        first = True
        try:
            while True:
                delta = await request.events.get()
                if delta.error:
                    yield _sse({"error": {"message": delta.error, "type": "server_error", "code": None}})
                    break
                if chat:
                    message: dict[str, str] = {"role": "assistant"} if first else {}
                    if delta.text:
                        message["content"] = delta.text
                    choice: dict[str, Any] = {"index": 0, "delta": message, "finish_reason": delta.finish_reason}
                else:
                    choice = {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}
                first = False
                chunk = _chunk(ident, body, chat, [choice])
                yield _sse(chunk)
                if delta.finish_reason:
                    if include_usage:
                        yield _sse({**_chunk(ident, body, chat, []), "usage": _usage(request)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()

    def _chunk(ident: str, body: _Generation, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body.model or alias, "choices": choices,
        }

    def _whole(body: _Generation, request: Request, deltas: list[Delta], chat: bool) -> JSONResponse:
        text = "".join(d.text for d in deltas)
        finish = deltas[-1].finish_reason
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return JSONResponse({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.model or alias, "choices": [choice], "usage": _usage(request),
        })

    return app


def _usage(request: Request) -> dict[str, Any]:
    return {
        "prompt_tokens": len(request.prompt),
        "completion_tokens": request.completion_tokens,
        "total_tokens": len(request.prompt) + request.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": request.cached_tokens},
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
