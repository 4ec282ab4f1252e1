"""Small helpers to read a voicepipe WebSocket in tests; every wait is bounded."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets


async def connect(url: str, **kwargs: Any):
    ws = await websockets.connect(url, max_size=None, **kwargs)
    started = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert started["type"] == "session.started", started
    return ws, started


async def next_event(ws, timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON event, skipping binary audio."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str):
                return json.loads(frame)


async def collect_until(ws, type_: str, timeout: float = 30.0) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Every event and audio frame up to and including the first event of `type_`."""
    events: list[dict[str, Any]] = []
    audio: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                audio.append(frame)
                continue
            events.append(json.loads(frame))
            if events[-1]["type"] == type_:
                return events, audio


async def wait_closed(ws, timeout: float = 10.0) -> int:
    """Drain until the server closes; returns the close code."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else 1006
