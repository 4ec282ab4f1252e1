"""Steady conversational traffic for drain, restart and failover tests and benchmarks: clients that
each send a typed turn as soon as the previous one is done, and count what came back.

The fake LLM runs with `echo`, so every reply says how many earlier questions the orchestrator was
given: a turn whose reply does not count all of its conversation's earlier turns lost history."""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

import websockets

from voicepipe.client import with_query

REMEMBERED = re.compile(r"I remember (\d+) earlier questions")


@dataclass
class TurnFailure:
    conversation: int
    turn: int
    why: str


@dataclass
class Talker:
    """One client: a socket on `url`, typed turns one after the other."""

    index: int
    url: str
    turn_timeout_s: float = 30.0
    turns_done: int = 0
    remembered: int = 0  # earlier turns the orchestrator must have in the history
    resync: bool = False  # after a failure the history may or may not hold the failed turn
    failures: list[TurnFailure] = field(default_factory=list)
    session: dict = field(default_factory=dict)
    ws: websockets.ClientConnection | None = None

    async def connect(self, url: str | None = None, **query: str) -> dict:
        target = with_query(url or self.url, **query) if query else (url or self.url)
        self.ws = await websockets.connect(target, max_size=None, open_timeout=30)
        async with asyncio.timeout(30):
            self.session = json.loads(await self.ws.recv())
        assert self.session["type"] == "session.started", self.session
        return self.session

    async def resume_on(self, url: str) -> dict:
        """Reconnect to `url` (any gateway) with the conversation's resume token."""
        return await self.connect(url, conversation_id=self.session["conversation_id"], resume_token=self.session["resume_token"])

    async def turn(self) -> str | None:
        """One typed turn; returns the reply text, or None (and records why) if it failed."""
        number = self.turns_done + len(self.failures)
        events: list[dict] = []
        try:
            await self.ws.send(json.dumps({"type": "text.input", "text": f"question {number}"}))
            async with asyncio.timeout(self.turn_timeout_s):
                while True:
                    frame = await self.ws.recv()
                    if isinstance(frame, bytes):
                        continue
                    event = json.loads(frame)
                    events.append(event)
                    if event["type"] == "response.done":
                        break
        except (TimeoutError, websockets.ConnectionClosed) as exc:
            return self._failed(number, f"{type(exc).__name__} after {[e['type'] for e in events]}")
        errors = [e for e in events if e["type"] == "error"]
        text = events[-1].get("text", "")
        found = REMEMBERED.search(text)
        if errors:
            return self._failed(number, f"error {errors}")
        if found is None or (int(found.group(1)) != self.remembered and not self.resync):
            return self._failed(number, f"history lost: {text!r} (expected {self.remembered} earlier questions)")
        self.turns_done += 1
        self.remembered, self.resync = int(found.group(1)) + 1, False
        return text

    def _failed(self, number: int, why: str) -> None:
        self.failures.append(TurnFailure(self.index, number, why))
        self.resync = True

    async def talk_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await self.turn() is None and self.ws.close_code is not None:
                return

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()
