"""Conversations of the replica-failure tests and benchmark (tests/e2e/test_replicas.py,
bench/replica_failure.py): raw client sockets whose turns record every event, and say when a turn
hung. The processes themselves are tests/support/cluster.py's."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import websockets

TURN_ENDING_ERRORS = {"stage_failed", "stage_unavailable"}
# the replica-failure figures are taken with these (docs/PERFORMANCE.md "Replica failure")
REPLICA_SETTINGS = {"heartbeat_interval_s": "0.5", "stale_timeout_s": "4"}


@dataclass
class TurnResult:
    turn_id: str | None = None
    errors: list[str] = field(default_factory=list)
    done: dict | None = None
    deltas: int = 0
    events: list[str] = field(default_factory=list)  # every event's type, in order (binary frames: "audio")
    sent_at: float = 0.0
    ended_at: float = 0.0


class Hung(AssertionError):
    """A turn that did not end: the conversation, and the events that did arrive."""


class Conversation:
    """One client socket, raw frames, and the events of its turns."""

    def __init__(self, ws, started: dict) -> None:
        self.ws = ws
        self.id = started["conversation_id"]

    @classmethod
    async def open(cls, url: str) -> "Conversation":
        ws = await websockets.connect(url, max_size=None, open_timeout=30)
        started = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert started["type"] == "session.started", started
        return cls(ws, started)

    async def send_text(self, text: str) -> float:
        await self.ws.send(json.dumps({"type": "text.input", "text": text}))
        return time.monotonic()

    async def receive_turn(self, result: TurnResult, first_delta: asyncio.Event | None = None) -> TurnResult:
        """Events until the turn's `response.done` (the caller bounds the wait)."""
        while True:
            frame = await self.ws.recv()
            if isinstance(frame, bytes):
                if result.events[-1:] != ["audio"]:
                    result.events.append("audio")
                continue
            event = json.loads(frame)
            kind = event["type"]
            result.events.append(kind)
            if kind == "error":
                result.errors.append(event["code"])
                result.turn_id = result.turn_id or event.get("turn_id")
            elif kind == "response.text.delta":
                result.deltas += 1
                result.turn_id = result.turn_id or event["turn_id"]
                if first_delta is not None:
                    first_delta.set()
            elif kind == "response.done":
                result.done, result.turn_id, result.ended_at = event, event["turn_id"], time.monotonic()
                return result

    async def turn(self, text: str, timeout: float, first_delta: asyncio.Event | None = None) -> TurnResult:
        """One typed turn; a turn that does not end within `timeout` raises `Hung` with what arrived."""
        result = TurnResult()
        result.sent_at = await self.send_text(text)
        try:
            async with asyncio.timeout(timeout):
                return await self.receive_turn(result, first_delta)
        except TimeoutError:
            raise Hung(self.id, result.events) from None

    async def close(self) -> None:
        await self.ws.close()
