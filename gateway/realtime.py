"""The OpenAI Realtime API, `GET /v1/realtime` (docs/protocol.md §6), over the conversation core.

A client written for the Realtime API (the `openai` SDKs' `realtime.connect`, and the agents and
plugins built on it) talks to voicepipe by changing only its base URL. This adapter speaks the
GA event vocabulary (gateway/realtime_events.py) and drives the same conversation core as `/v1/ws`
(gateway/conversation.py), so a Realtime client gets the distributed stages, barge-in, instant
cleanup on disconnect, the limits and the metrics unchanged.

What the adapter adds is the translation:
- audio is PCM16 mono 24 kHz, base64 in JSON, both ways. The way in goes to the VAD/STT worker at
  24 kHz as it came (`AudioIn.sample_rate`): the worker segments it at that rate and brings each
  utterance to whisper's 16 kHz whole, so no streaming filter's group delay postpones the end of
  speech. The way out is resampled with soxr (shared/resample.py) from the voice's rate, one
  filter per reply so chunk boundaries are inaudible;
- a voicepipe turn becomes a user item and a response with its assistant item (`RealtimeTurns`);
- typed input is two steps in the Realtime API (`conversation.item.create`, then
  `response.create`); the core's typed turn is taken at the second;
- `session.update` becomes the conversation's settings (turn detection, silence, instructions),
  which the core sends to its workers; a session nobody changed behaves exactly like `/v1/ws`;
- `response.done` says how a reply ended: `completed`, `cancelled` (`turn_detected` for a barge-in,
  `client_cancelled` for `response.cancel` or a truncation of a reply under way), `incomplete`
  (blocked by the output guard) or `failed` (with the error).

The pipeline replies to every transcribed utterance by itself, with or without server VAD: a
`response.create` after a manual commit is taken as that reply's request and adds nothing."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from gateway import handshake
from gateway.client_socket import ClientSocket
from gateway.correlation import correlation_id as correlation_id_of
from gateway.realtime_events import (
    WIRE_RATE,
    InputAudioAppend,
    InputAudioClear,
    InputAudioCommit,
    ItemCreate,
    ItemTruncate,
    RealtimeError,
    RealtimeTurns,
    ResponseCancel,
    ResponseCreate,
    Session,
    SessionUpdate,
    decode_audio,
    parse_client_event,
    user_text,
)
from shared.logging import log_context
from shared.messages.client import JsonLimits
from shared.resample import Resampler

if TYPE_CHECKING:
    from gateway.conversation import Conversation
    from gateway.hub import Gateway

log = logging.getLogger("voicepipe.gateway.realtime")

SUBPROTOCOL = "realtime"  # what browsers offer beside `openai-insecure-api-key.<token>`
WIRE_BYTES_PER_MS = WIRE_RATE * 2 // 1000
CANCEL_REASONS = {"barge_in": "turn_detected", "cancelled": "client_cancelled", "truncated": "client_cancelled"}
MAX_PENDING_ITEMS = 32  # user messages created and not answered yet


class RealtimeWire:
    """The core's events as Realtime server events, and Realtime client events as core calls."""

    def __init__(self, gateway: Gateway, socket: ClientSocket, model: str) -> None:
        self._gateway = gateway
        self.socket = socket
        settings = gateway.settings
        self.json_limits = JsonLimits.from_settings(settings)
        self.session = Session(model=model, silence_duration_ms=settings.vad_end_silence_ms)
        self.turns = RealtimeTurns(self.session)
        self.conversation: Conversation | None = None
        self._downlink: dict[str, Resampler] = {}  # per turn: the voice's rate -> 24 kHz
        self._input_ms = 0.0  # audio appended so far (the Realtime input buffer's clock)
        self._uncommitted_ms = 0.0  # audio appended since the last commit or clear
        self._speech_from: dict[str, float] = {}  # turn -> where its speech began in the input (ms)
        self._pending: list[tuple[str, str]] = []  # (item id, text) created and not answered yet
        self._failed: dict[str, dict[str, str]] = {}  # turn -> the error that ended it
        self._blocked: set[str] = set()  # turns whose reply the output guard blocked

    # ---- out to the client
    def _send(self, events: list[dict[str, Any]] | dict[str, Any]) -> None:
        for event in events if isinstance(events, list) else [events]:
            self.socket.send(json.dumps(event))

    def _error(self, code: str, message: str, event_id: str | None = None, param: str | None = None,
               kind: str = "invalid_request_error") -> None:
        self._gateway.metrics.error_sent(code)
        self._send(self.turns.error(code, message, event_id, param, kind))

    # ---- the core's side (Wire)
    def event(self, kind: str, turn_id: str | None, fields: dict[str, Any]) -> None:
        turns = self.turns
        if turn_id is None:
            if kind == "error":
                self._send(turns.error(fields.get("code", "server_error"), fields.get("message", ""), kind="server_error"))
            return
        if turns.closed(turn_id) and kind != "error":
            return  # its response was closed already (interrupted, then its late events)
        match kind:
            case "speech.started":
                self._speech_from[turn_id] = self._input_ms
                if self.session.server_vad:
                    onset = self._input_ms - self._gateway.settings.vad_start_ms
                    self._send(turns.speech_started(turn_id, int(onset)))
            case "speech.stopped":
                events = turns.speech_stopped(turn_id, int(self._input_ms))
                self._send(events if self.session.server_vad else events[1:])  # manual: no VAD event
            case "transcript.final":
                seconds = (self._input_ms - self._speech_from.pop(turn_id, self._input_ms)) / 1000
                self._send(turns.transcribed(turn_id, fields.get("text", ""), seconds))
            case "response.text.delta":
                self._send(turns.text_delta(turn_id, fields.get("delta", "")))
            case "response.audio.started":
                self._downlink[turn_id] = Resampler(int(fields["sample_rate"]), WIRE_RATE)
            case "response.audio.done":
                resampler = self._downlink.pop(turn_id, None)
                if resampler is not None:
                    self._send(turns.audio_delta(turn_id, resampler.flush()))
            case "response.blocked":
                self._blocked.add(turn_id)
            case "response.interrupted":
                self._close_response(turn_id, "cancelled", CANCEL_REASONS.get(fields.get("reason"), "client_cancelled"))
            case "error":
                code, message = str(fields.get("code", "server_error")), str(fields.get("message", ""))
                self._failed[turn_id] = {"type": "server_error", "code": code, "message": message}
                self._send(turns.error(code, message, kind="server_error"))
            case "response.done":
                error = self._failed.pop(turn_id, None)
                if error is not None:
                    self._close_response(turn_id, "failed", None, error=error)
                elif turn_id in self._blocked:
                    self._close_response(turn_id, "incomplete", "content_filter")
                else:
                    timings = {key: fields[key] for key in ("metrics", "diagnostics") if key in fields}
                    self._close_response(turn_id, "completed", None, text=fields.get("text"), timings=timings)
            case _:
                pass  # transcript.partial: not part of this protocol

    def _close_response(self, turn_id: str, status: str, reason: str | None, text: str | None = None,
                        error: dict[str, str] | None = None, timings: dict[str, Any] | None = None) -> None:
        self._downlink.pop(turn_id, None)
        self._blocked.discard(turn_id)
        self._send(self.turns.response_done(turn_id, status, reason, text=text, error=error, timings=timings))

    def audio(self, turn_id: str, pcm: bytes) -> None:
        if self.turns.closed(turn_id):
            return
        resampler = self._downlink.get(turn_id)
        if resampler is not None:
            pcm = resampler.convert(pcm)
        self._send(self.turns.audio_delta(turn_id, pcm))

    async def close(self, code: int, reason: str) -> None:
        await self.socket.close(code, reason)

    async def refuse(self, code: str, message: str, close_code: int, close_reason: str) -> None:
        self._gateway.metrics.error_sent(code)
        with contextlib.suppress(Exception):
            await self.socket.websocket.send_text(json.dumps(self.turns.error(code, message, kind="server_error")))
            await self.socket.websocket.close(close_code, handshake.close_reason(close_reason))

    # ---- the client's side (Frames)
    async def run(self, conversation: Conversation) -> str:
        self.conversation = conversation
        created = self.turns.session_created()
        # how to take the conversation up again on a new socket (`?conversation_id=&resume_token=`,
        # as on /v1/ws): a field the API does not define, which the SDKs keep
        created["voicepipe"] = {
            "conversation_id": conversation.conversation_id,
            "resume_token": conversation.resume_token,
            "resumed": conversation.resumed,
        }
        self._send(created)
        return await self.socket.run(self)

    def rate_limited(self, message: str) -> None:
        self._error("rate_limited", message)

    async def on_bytes(self, data: bytes) -> None:
        self._error("invalid_event", "binary frames are not part of this protocol: send input_audio_buffer.append")

    async def on_text(self, text: str) -> None:
        try:
            event = parse_client_event(text, self.json_limits)
            await self._handle(event)
        except RealtimeError as exc:
            self._error(exc.code, exc.message, exc.event_id, exc.param)

    async def _handle(self, event: Any) -> None:
        conversation = self.conversation
        match event:
            case InputAudioAppend():
                pcm = decode_audio(event)
                ms = len(pcm) / WIRE_BYTES_PER_MS
                self._input_ms += ms
                self._uncommitted_ms += ms
                await conversation.audio(pcm, WIRE_RATE)
            case InputAudioCommit():
                if self._uncommitted_ms < 100:
                    raise RealtimeError(
                        "input_audio_buffer_commit_empty",
                        f"buffer too small: at least 100 ms of audio is needed, {self._uncommitted_ms:.0f} ms was appended",
                        event.event_id,
                    )
                self._uncommitted_ms = 0.0
                conversation.commit()
            case InputAudioClear():
                self._uncommitted_ms = 0.0
                conversation.clear()
                self._send(self.turns.cleared())
            case SessionUpdate():
                await self._update(event)
            case ItemCreate():
                text = user_text(event)
                if len(self._pending) >= MAX_PENDING_ITEMS:
                    raise RealtimeError("too_many_items", "send response.create for the messages already created", event.event_id)
                item_id = event.item.get("id") if isinstance(event.item.get("id"), str) else None
                item_id = (item_id or self.turns.new_item_id())[:64]
                self._pending.append((item_id, text))
                self._send(self.turns.typed(item_id, text, item_id))
            case ResponseCreate():
                if self._pending:
                    items, self._pending = self._pending, []
                    turn_id = await conversation.say("\n".join(text for _, text in items))
                    self.turns.rekey(items[-1][0], turn_id)
                elif not conversation.turns.unfinished():  # else: the reply to the utterance just committed
                    raise RealtimeError("no_input", "nothing to respond to: create a user message or commit audio first", event.event_id)
            case ResponseCancel():
                if await conversation.cancel() is None:
                    raise RealtimeError("response_cancel_not_active", "there is no active response to cancel", event.event_id)
            case ItemTruncate():
                turn_id = self.turns.find_item(event.item_id)
                if turn_id is None or not await conversation.truncate(turn_id, float(event.audio_end_ms)):
                    raise RealtimeError("item_not_found", f"no assistant item {event.item_id[:64]} to truncate", event.event_id, "item_id")
                self._send(self.turns.truncated(event.item_id, event.audio_end_ms))

    async def _update(self, event: SessionUpdate) -> None:
        session = self.session
        before = (session.server_vad, session.silence_duration_ms, session.instructions)
        session.update(event.session, event.event_id)
        after = (session.server_vad, session.silence_duration_ms, session.instructions)
        if after != before:
            await self.conversation.configure(
                "server_vad" if session.server_vad else "manual",
                session.silence_duration_ms if session.server_vad else None,
                session.instructions or None,
            )
        self._send(self.turns.session_updated())


async def serve_realtime(gateway: Gateway, websocket: WebSocket) -> None:
    """The whole life of one `/v1/realtime` connection."""
    correlation_id = correlation_id_of(websocket.scope["headers"])
    with log_context(correlation_id=correlation_id):
        try:
            admission = await handshake.admit(gateway, websocket, correlation_id, SUBPROTOCOL)
        except (ClientDisconnected, WebSocketDisconnect, OSError):
            return
        if admission is None:
            return
        try:
            try:
                await websocket.accept(subprotocol=admission.subprotocol)
            except (ClientDisconnected, WebSocketDisconnect, OSError):
                return
            model = (websocket.query_params.get("model") or gateway.settings.llm_model)[:64]
            wire = RealtimeWire(gateway, ClientSocket(gateway, websocket, "realtime"), model)
            params = websocket.query_params
            await gateway.serve_conversation(
                wire, wire.run, correlation_id, params.get("conversation_id"), params.get("resume_token")
            )
        finally:
            if admission.slot is not None:
                await asyncio.shield(gateway.limits.release(admission.slot))
