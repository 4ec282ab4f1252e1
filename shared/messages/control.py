"""Lifecycle and errors: travel ahead of data and are handled at once."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.clock import now_ms
from shared.messages.envelope import Envelope

DisconnectReason = Literal["client_disconnect", "server_error", "timeout"]


class ConnectionDisconnected(Envelope):
    """Gateway -> every worker on `connection_events` (PROTOCOL.md §2): the WebSocket ended.

    Every worker drops everything it holds for the conversation; the history stays for resume."""

    type: Literal["connection_disconnected"] = "connection_disconnected"
    timestamp_ms: int = Field(default_factory=now_ms)
    reason: DisconnectReason
    gateway_id: str | None = None
    detail: str | None = None


class StageError(Envelope):
    """Any worker -> gateway: a recoverable error the client should see as `error` {code, message}."""

    type: Literal["stage.error"] = "stage.error"
    code: str
    message: str
