"""Small helpers to read a voicepipe WebSocket in tests; every wait is bounded."""
from __future__ import annotations

import asyncio
import base64
import json
import os
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


async def raw_handshake(port: int, target: bytes, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict[str, str]]:
    """A WebSocket upgrade request written byte by byte (so headers may hold any bytes at all);
    returns the HTTP status and headers of the answer, then drops the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [
            b"GET " + target + b" HTTP/1.1",
            b"Host: 127.0.0.1:%d" % port,
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
            b"Sec-WebSocket-Version: 13",
            *(name + b": " + value for name, value in headers),
        ]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.transport.abort()
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        if ":" in line:
            name, _, value = line.partition(":")
            found[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), found


async def refused_status(url: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
    """Connect expecting an HTTP refusal of the handshake; returns its status and headers."""
    try:
        ws = await websockets.connect(url, **kwargs)
    except websockets.InvalidStatus as refused:
        return refused.response.status_code, {k.lower(): v for k, v in refused.response.headers.raw_items()}
    await ws.close()
    raise AssertionError(f"{url} was accepted")
