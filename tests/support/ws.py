"""Tests' view of the client socket: the protocol client's reading helpers (voicepipe/client.py),
and handshakes written by hand for what a well-behaved client would never send. Every wait is bounded."""
from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import websockets

from voicepipe.client import VoiceClient, collect_until, next_event, wait_closed

__all__ = ["collect_until", "connect", "next_event", "raw_handshake", "refused_status", "wait_closed"]


async def connect(url: str, *, additional_headers: dict[str, str] | None = None, **options: Any):
    """A connected socket of the one protocol client (voicepipe/client.py) and its `session.started`."""
    client = await VoiceClient(url, headers=additional_headers, **options).open()
    return client.ws, client.session


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
