"""The voicepipe protocol, `/v1/ws` (docs/protocol.md §1), over the conversation core.

Binary frames are PCM s16le mono 16 kHz audio; text frames are the JSON messages of
shared/messages/client.py. The core's events are this protocol's own events, so the adapter only
serializes them; reply audio goes out as binary frames at the voice's rate. What is particular
to `/v1/ws` is here: the handshake's subprotocol `voicepipe.v1`, resuming a conversation with its
`conversation_id` and `resume_token`, `session.started`, and `ping`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from gateway import handshake
from gateway.auth import SUBPROTOCOL
from gateway.client_socket import ClientSocket
from gateway.correlation import correlation_id as correlation_id_of
from shared.logging import log_context
from shared.messages.client import (
    INPUT_AUDIO,
    BadClientMessage,
    InputAudioCommit,
    JsonLimits,
    Ping,
    ResponseCancelRequest,
    TextInputRequest,
    parse_client_message,
    server_event,
)

if TYPE_CHECKING:
    from gateway.conversation import Conversation
    from gateway.hub import Gateway

log = logging.getLogger("voicepipe.gateway.ws")


class VoicepipeWire:
    """The core's events as `/v1/ws` frames, and this protocol's client frames as core calls."""

    def __init__(self, gateway: Gateway, socket: ClientSocket) -> None:
        self._gateway = gateway
        self.socket = socket
        self.json_limits = JsonLimits.from_settings(gateway.settings)
        self.conversation: Conversation | None = None

    # ---- the core's side (Wire)
    def event(self, kind: str, turn_id: str | None, fields: dict[str, Any]) -> None:
        self.socket.send(server_event(kind, turn_id, **fields))

    def audio(self, turn_id: str, pcm: bytes) -> None:
        self.socket.send(pcm)

    async def close(self, code: int, reason: str) -> None:
        await self.socket.close(code, reason)

    async def refuse(self, code: str, message: str, close_code: int, close_reason: str) -> None:
        """Before the conversation is served: one `error`, then the close."""
        self._gateway.metrics.error_sent(code)
        with contextlib.suppress(Exception):
            await self.socket.websocket.send_text(server_event("error", code=code, message=message))
            await self.socket.websocket.close(close_code, handshake.close_reason(close_reason))

    # ---- the client's side (Frames)
    async def run(self, conversation: Conversation) -> str:
        self.conversation = conversation
        self.event(
            "session.started",
            None,
            {
                "conversation_id": conversation.conversation_id,
                "correlation_id": conversation.correlation_id,
                "resume_token": conversation.resume_token,
                "resumed": conversation.resumed,
                "input_audio": INPUT_AUDIO,
                "output_audio": {
                    "encoding": "pcm_s16le",
                    "sample_rate": self._gateway.directory.output_sample_rate() or 22050,
                    "channels": 1,
                },
            },
        )
        return await self.socket.run(self)

    async def on_bytes(self, data: bytes) -> None:
        await self.conversation.audio(data)

    def rate_limited(self, message: str) -> None:
        self.conversation.emit("error", code="rate_limited", message=message)

    async def on_text(self, text: str) -> None:
        conversation = self.conversation
        try:
            request = parse_client_message(text, self.json_limits)
        except BadClientMessage as exc:
            conversation.emit("error", code="bad_message", message=str(exc))
            return
        if isinstance(request, Ping):
            conversation.emit("pong")
        elif isinstance(request, InputAudioCommit):
            conversation.commit()
        elif isinstance(request, TextInputRequest):
            await conversation.say(request.text)
        elif isinstance(request, ResponseCancelRequest):
            await conversation.cancel()


async def serve_client(gateway: Gateway, websocket: WebSocket) -> None:
    """The whole life of one `/v1/ws` connection."""
    correlation_id = correlation_id_of(websocket.scope["headers"])
    with log_context(correlation_id=correlation_id):
        try:
            admission = await handshake.admit(gateway, websocket, correlation_id, SUBPROTOCOL)
        except (ClientDisconnected, WebSocketDisconnect, OSError):
            return  # the client left during its own refusal
        if admission is None:
            return
        try:
            await _serve_admitted(gateway, websocket, correlation_id, admission)
        finally:
            if admission.slot is not None:
                await asyncio.shield(gateway.limits.release(admission.slot))


async def _serve_admitted(
    gateway: Gateway, websocket: WebSocket, correlation_id: str, admission: handshake.Admission
) -> None:
    try:
        await websocket.accept(subprotocol=admission.subprotocol)
    except (ClientDisconnected, WebSocketDisconnect, OSError):
        return
    params = websocket.query_params
    conversation_id, token = params.get("conversation_id"), params.get("resume_token")
    wire = VoicepipeWire(gateway, ClientSocket(gateway, websocket, conversation_id or "new"))
    await gateway.serve_conversation(wire, wire.run, correlation_id, conversation_id, token)
