"""The OpenAI Audio API over the pipeline's workers (docs/protocol.md §6):
`POST /v1/audio/transcriptions` and `POST /v1/audio/speech`, for tools such as Open WebUI or
`client.audio.*` of the `openai` SDKs.

Only the HTTP side lives here: checking the request, decoding the upload (PyAV, off the event
loop), and shaping the answer. The work is a one-shot request to a VAD/STT or TTS worker over the
bus (gateway/requests.py), so it scales with the stages and takes its fair turn with the
conversations on the same models. Errors use the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`; a message never quotes the client's input.

Speech is streamed: the first sentence's audio leaves while the next one is spoken. The status
line is sent only once the worker has answered, so a refusal (no worker, too many requests) is a
proper HTTP error; a failure after that ends the stream early (logged)."""
from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from gateway import auth
from gateway.hub import Gateway
from gateway.requests import OpenRequest, RequestFailed
from shared.audiofile import SPEECH_FORMATS, AudioFileError, SpeechEncoder, decode_audio
from shared.logging import correlation_id_var, log_context
from shared.messages import (
    SpeechAudio,
    SpeechDone,
    SpeechRequest,
    TranscriptionRequest,
    TranscriptionResult,
)
from shared.resample import Resampler
from shared.stages import Stage

log = logging.getLogger("voicepipe.gateway.audio_api")

router = APIRouter()

STT_RATE = 16000
SPEECH_RATE = 24000  # what OpenAI's `pcm` is, and what every format here is encoded at
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # the OpenAI limit
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
STATUS = {
    "invalid_request": 400,
    "invalid_api_key": 401,
    "file_too_large": 413,
    "rate_limited": 429,
    "stage_failed": 502,
    "stage_unavailable": 503,
    "bus_unavailable": 503,
    "not_ready": 503,
}


def openai_error(code: str, message: str, param: str | None = None) -> JSONResponse:
    status = STATUS.get(code, 500)
    kind = "invalid_request_error" if status < 500 and status != 429 else ("rate_limit_error" if status == 429 else "server_error")
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _authorized(gateway: Gateway, request: Request) -> bool:
    if not gateway.client_tokens:
        return True
    presented = auth.presented_tokens(None, auth.header_value(request.scope["headers"], b"authorization"), [])
    return auth.valid_client_token(presented, gateway.client_tokens) is not None


def _refused(gateway: Gateway, request: Request) -> JSONResponse | None:
    if not _authorized(gateway, request):
        return openai_error("invalid_api_key", "a valid client token is required (Authorization: Bearer <token>)")
    if gateway.closing:
        return openai_error("not_ready", "the gateway is shutting down")
    return None


# ---- transcriptions
def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _transcription_answer(result: TranscriptionResult, response_format: str) -> Response:
    text, duration = result.text, round(result.duration_s, 3)
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(f"1\n{_timestamp(0, ',')} --> {_timestamp(duration, ',')}\n{text}\n")
    if response_format == "vtt":
        return PlainTextResponse(f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(duration, '.')}\n{text}\n", media_type="text/vtt")
    if response_format == "verbose_json":
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": [], "temperature": 0.0,
                   "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
        return JSONResponse({"task": "transcribe", "language": "english", "duration": duration, "text": text,
                             "segments": [segment] if text else []})
    return JSONResponse({"text": text, "usage": {"type": "duration", "seconds": max(1, round(duration))}})


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if (refusal := _refused(gateway, request)) is not None:
        return refusal
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 64 * 1024:
        return openai_error("file_too_large", f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB", "file")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except (HTTPException, MultiPartException, ValueError):  # malformed multipart
        return openai_error("invalid_request", "the body must be multipart/form-data with a `file` field")
    try:
        upload = form.get("file")
        response_format = str(form.get("response_format") or "json")
        if not isinstance(upload, UploadFile):
            return openai_error("invalid_request", "the `file` field (an audio file) is required", "file")
        if response_format not in TRANSCRIPTION_FORMATS:
            return openai_error("invalid_request", f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
    finally:
        await form.close()  # the spooled upload file
    if len(data) > MAX_UPLOAD_BYTES:
        return openai_error("file_too_large", f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB", "file")
    try:
        pcm = await asyncio.to_thread(decode_audio, data, STT_RATE, gateway.settings.transcription_max_s)
    except AudioFileError as exc:
        return openai_error("invalid_request", f"could not read the audio: {exc}", "file")
    requests = gateway.requests
    request_id = requests.new_id()
    with log_context(request_id):
        try:
            async with requests.open(Stage.VAD_STT, request_id) as pending:
                message = TranscriptionRequest(
                    conversation_id=request_id, correlation_id=correlation_id_var.get(), gateway=gateway.gateway_id, pcm=pcm
                )
                await requests.send(pending, message)
                result = await pending.next(gateway.directory, gateway.settings.request_timeout_s)
                pending.finished = True
        except RequestFailed as exc:
            return openai_error(exc.code, exc.message)
    if not isinstance(result, TranscriptionResult):
        return openai_error("stage_failed", "the worker answered out of turn")
    if result.code is not None:
        return openai_error(result.code, result.message or "the transcription failed")
    return _transcription_answer(result, response_format)


# ---- speech
class SpeechBody(BaseModel):
    """The JSON body of POST /v1/audio/speech. `model`, `voice` and `instructions` are accepted and
    ignored: the deployment's voice speaks."""

    model_config = ConfigDict(extra="ignore")

    input: str = Field(min_length=1)
    model: str | None = None
    voice: str | dict[str, Any] | None = None
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: str | None = None


def _speech_body(raw: bytes, max_chars: int) -> SpeechBody | JSONResponse:
    try:
        body = SpeechBody.model_validate_json(raw)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors(include_url=False)[0]["loc"]) or None
        return openai_error("invalid_request", "the body must be JSON with a non-empty `input` string", where)
    if len(body.input) > max_chars:
        return openai_error("invalid_request", f"`input` is longer than {max_chars} characters", "input")
    if body.response_format not in SPEECH_FORMATS:
        return openai_error("invalid_request", f"response_format must be one of {', '.join(SPEECH_FORMATS)}", "response_format")
    if body.speed != 1.0:
        return openai_error("invalid_request", "only speed 1.0 is supported", "speed")
    if body.stream_format not in (None, "audio"):
        return openai_error("invalid_request", "only stream_format `audio` is supported", "stream_format")
    return body


class _StreamedSpeech(StreamingResponse):
    """A streamed answer that always releases its request when the response ends, however it
    ends: sent whole, the client gone before the first byte, or the server stopping."""

    def __init__(self, content, media_type: str, release: AsyncExitStack) -> None:
        super().__init__(content, media_type=media_type)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release.aclose()


async def _speech_chunks(gateway: Gateway, pending: OpenRequest, first: SpeechAudio | SpeechDone, encoder: SpeechEncoder):
    """The encoded audio, chunk by chunk, until the worker's SpeechDone."""
    resampler: Resampler | None = None
    answer: SpeechAudio | SpeechDone = first
    try:
        while isinstance(answer, SpeechAudio):
            if resampler is None:
                resampler = Resampler(answer.sample_rate, SPEECH_RATE)
            if out := await asyncio.to_thread(encoder.encode, resampler.convert(answer.pcm)):
                yield out
            answer = await pending.next(gateway.directory, gateway.settings.request_timeout_s)
    except RequestFailed as exc:  # the status line is gone already: the stream just ends
        log.warning("speech request failed while streaming: %s", exc.code)
        return
    pending.finished = True
    if answer.code is not None:
        log.warning("speech request ended early: %s", answer.code)
    tail = resampler.flush() if resampler is not None else b""
    if out := await asyncio.to_thread(lambda: encoder.encode(tail) + encoder.finish()):
        yield out


@router.post("/v1/audio/speech")
async def speech(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if (refusal := _refused(gateway, request)) is not None:
        return refusal
    body = _speech_body(await request.body(), gateway.settings.speech_max_chars)
    if isinstance(body, JSONResponse):
        return body
    requests = gateway.requests
    request_id = requests.new_id()
    release = AsyncExitStack()
    try:
        with log_context(request_id):
            pending = await release.enter_async_context(requests.open(Stage.TTS, request_id))
            message = SpeechRequest(
                conversation_id=request_id, correlation_id=correlation_id_var.get(), gateway=gateway.gateway_id, text=body.input
            )
            await requests.send(pending, message)
            first = await pending.next(gateway.directory, gateway.settings.request_timeout_s)
            if isinstance(first, SpeechDone) and first.code is not None:
                pending.finished = True
                raise RequestFailed(first.code, first.message or "the speech synthesis failed")
            if not isinstance(first, (SpeechAudio, SpeechDone)):
                raise RequestFailed("stage_failed", "the worker answered out of turn")
            encoder = SpeechEncoder(body.response_format, SPEECH_RATE)
            release.callback(encoder.close)
            response = _StreamedSpeech(_speech_chunks(gateway, pending, first, encoder), encoder.media_type, release)
    except RequestFailed as exc:
        await release.aclose()
        return openai_error(exc.code, exc.message)
    except BaseException:
        await release.aclose()
        raise
    return response

