"""Lifecycle and errors: travel ahead of data and are handled at once."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.clock import now_ms
from shared.messages.envelope import Envelope

DisconnectReason = Literal["client_disconnect", "server_error", "timeout"]


class ConnectionDisconnected(Envelope):
    """Gateway -> every worker on `connection_events` (docs/protocol.md §2): the WebSocket ended.

    Every worker drops everything it holds for the conversation; the history stays for resume."""

    type: Literal["connection_disconnected"] = "connection_disconnected"
    timestamp_ms: int = Field(default_factory=now_ms)
    reason: DisconnectReason
    gateway_id: str | None = None
    connection_id: str | None = None  # which socket of the conversation ended (a resume opens a new one)
    detail: str | None = None


class ConversationOpened(Envelope):
    """Gateway -> each worker routed to a new socket: the conversation is live, with this route.

    Workers prepare their state (processors, history) now, so the first turn waits for nothing.
    Published right after the routing lease is written, so it always precedes the socket's
    `connection_disconnected` on every subscriber.

    Sent again, same `connection_id`, when the route of a live socket changes: a draining worker
    hands the conversation to another replica (workers/handoff.py), or the gateway moves it off a
    worker that died (gateway/reroute.py). The new owner prepares, the others follow the new route."""

    type: Literal["conversation.opened"] = "conversation.opened"
    gateway: str
    vad_stt: str
    llm: str
    tts: str
    connection_id: str


class ConversationConfigured(Envelope):
    """Gateway -> the conversation's VAD/STT and LLM workers: the settings its client chose (the
    OpenAI Realtime `session.update`). Sent when they change, and again whenever the conversation
    moves to another worker, so a new owner never serves it with the defaults.

    `turn_detection` `server_vad`: the VAD ends an utterance after `end_silence_ms` of silence
    (None: the `VAD_END_SILENCE_MS` setting). `manual`: silence never ends it and no speech
    interrupts a reply by itself; the utterance is all audio since the last commit or clear, and
    `audio.commit` ends it. `instructions` replace `SYSTEM_PROMPT` for this conversation (None: the
    setting)."""

    type: Literal["conversation.configured"] = "conversation.configured"
    turn_detection: Literal["server_vad", "manual"] = "server_vad"
    end_silence_ms: int | None = Field(default=None, ge=20, le=10_000)
    instructions: str | None = Field(default=None, max_length=32_768)


class StageError(Envelope):
    """Any worker -> gateway: a recoverable error the client should see as `error` {code, message}."""

    type: Literal["stage.error"] = "stage.error"
    code: str
    message: str


class IntrospectRequest(Envelope):
    """Gateway -> every worker on the control channel: report what you hold, to `reply_to`.

    `conversation_id` empty: report everything (for /admin/workers); else that conversation only.
    `held_of`: also say which of these conversations are still held (the gateway's shutdown waits
    until none is)."""

    type: Literal["introspect.request"] = "introspect.request"
    request_id: str
    reply_to: str
    held_of: list[str] = Field(default_factory=list)


class IntrospectReply(Envelope):
    """Worker -> the asking gateway's inbox: the answer to one `IntrospectRequest`."""

    type: Literal["introspect.reply"] = "introspect.reply"
    request_id: str
    worker_id: str
    stage: str
    last_heartbeat_ms: int
    conversations: int
    resources: dict[str, int]
    holds: dict[str, int] | None = None
    cleaned_ms: float | None = None  # when this worker last finished cleaning the conversation
    stats: dict[str, float | int] = Field(default_factory=dict)
    pools: dict[str, dict[str, int]] = Field(default_factory=dict)
    still_held: list[str] = Field(default_factory=list)  # of the request's `held_of`


class SessionTakeover(Envelope):
    """Gateway -> the gateway holding a conversation's old socket: a resume took the conversation
    over; close that socket (its cleanup runs as for any disconnect)."""

    type: Literal["session.takeover"] = "session.takeover"
    connection_id: str
