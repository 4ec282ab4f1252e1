"""One client WebSocket as a transport, whatever protocol it speaks: a receive loop beside one sender.

Client input is never trusted: every frame passes the connection's size and rate limits before
anything else is done with it (gateway/ratelimit.py), and only then reaches the protocol
(`Frames`). Nothing a client sends ends the socket with 1011; only the server's own failures do.
Outbound frames are bounded in bytes (gateway/outbound.py): a client that stops reading is closed
with 1008, a policy violation on its side (1011 would claim a server fault, and 1013 is the
connection limit's code in PROTOCOL §1.2, telling a client to come back later, which would not
help it). Both `/v1/ws` and `/v1/realtime` run on this, so both get the same limits."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

from gateway import handshake
from gateway.keepalive import ABORT_AFTER_EXTENSION, KEEPALIVE_TIMEOUT
from gateway.outbound import Outbound
from gateway.ratelimit import RateGuard, Verdict
from shared.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.hub import Gateway

log = logging.getLogger("voicepipe.gateway.socket")

SLOW_CLOSE_GRACE_S = 2.0  # a client too slow to read gets this long for the close, then TCP is dropped


class Frames(Protocol):
    """The protocol spoken on the socket: what it does with each frame that passed the limits."""

    async def on_text(self, text: str) -> None: ...

    async def on_bytes(self, data: bytes) -> None: ...

    def rate_limited(self, message: str) -> None:
        """Tell the client its frames are being dropped (once per burst)."""


class ClientSocket:
    def __init__(self, gateway: Gateway, websocket: WebSocket, name: str) -> None:
        self._gateway = gateway
        self.websocket = websocket
        settings = gateway.settings
        self._outbound = Outbound(settings.max_outbound_bytes)
        self._outbound_closing = False  # set once the client is being closed for not reading
        self.rate = RateGuard(
            settings.max_messages_per_s,
            settings.audio_realtime_factor,
            settings.rate_limit_close_s,
            max_frame_bytes=settings.max_audio_frame_bytes,
        )
        self._tasks = TaskSet(f"socket:{name}")

    # ---- outbound
    def send(self, frame: str | bytes) -> None:
        """Queue one frame (never blocks); past `MAX_OUTBOUND_BYTES` the client is closed instead."""
        if self._outbound.put(frame) or self._outbound_closing:
            return
        self._outbound_closing = True
        self._gateway.stats.closed_slow += 1
        log.warning("client is not reading (over %d bytes queued); closing the connection", self._outbound.max_bytes)
        self._tasks.spawn(self._close_slow(), name="close-slow")

    async def _close_slow(self) -> None:
        """Close a client that does not read. Its close frame may never get through a full TCP
        window, so the connection is dropped after SLOW_CLOSE_GRACE_S in any case."""
        abort_after = self.websocket.scope.get("extensions", {}).get(ABORT_AFTER_EXTENSION)
        if abort_after is not None:
            abort_after(SLOW_CLOSE_GRACE_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SLOW_CLOSE_GRACE_S):
                await self.close(1008, "client too slow: not reading")

    async def _send_loop(self) -> None:
        """Write queued frames until the socket goes away (then the receiver reports why)."""
        to_client = self._gateway.latency.to_client
        while True:
            frame, queued_at = await self._outbound.get()
            try:
                if isinstance(frame, bytes):
                    await self.websocket.send_bytes(frame)
                else:
                    await self.websocket.send_text(frame)
            except (WebSocketDisconnect, ClientDisconnected, RuntimeError, OSError) as exc:
                log.debug("stopped sending: %s", type(exc).__name__)
                return
            to_client.observe((time.perf_counter() - queued_at) * 1000)

    async def close(self, code: int, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.websocket.close(code, handshake.close_reason(reason))

    # ---- the connection
    async def run(self, frames: Frames) -> str:
        """Serve the socket until it ends; returns the disconnect reason."""
        sender = self._tasks.spawn(self._send_loop(), name="sender")
        receiver = self._tasks.spawn(self._receive_loop(frames), name="receiver")
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():  # the socket broke under the sender: the receiver will say how
                await asyncio.wait({receiver}, timeout=1.0)
            return receiver.result() if receiver.done() else "client_disconnect"
        finally:
            await self._tasks.aclose()

    async def _receive_loop(self, frames: Frames) -> str:
        limit = self._gateway.settings.max_audio_frame_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1005)
                if message.get("reason") == KEEPALIVE_TIMEOUT:
                    log.info("client stopped answering pings")
                    return "timeout"
                log.info("client socket closed with code %s", code)
                return "client_disconnect"
            data = message.get("bytes")
            if data is not None:
                if len(data) > limit:
                    await self.close(1009, "audio frame larger than 64 KiB")
                    return "client_disconnect"
                verdict = self.rate.audio(len(data))
                if verdict is Verdict.PASS:
                    await frames.on_bytes(data)
                elif await self._rate_limited(frames, verdict, "audio"):
                    return "client_disconnect"
            elif (text := message.get("text")) is not None:
                if len(text) > limit:
                    await self.close(1009, "message larger than 64 KiB")
                    return "client_disconnect"
                verdict = self.rate.text()
                if verdict is Verdict.PASS:
                    await frames.on_text(text)
                elif await self._rate_limited(frames, verdict, "text"):
                    return "client_disconnect"

    async def _rate_limited(self, frames: Frames, verdict: Verdict, kind: str) -> bool:
        """A frame over the rate was dropped; True when the client has been closed for it."""
        stats = self._gateway.stats
        stats.rate_limited_frames[kind] = stats.rate_limited_frames.get(kind, 0) + 1
        settings = self._gateway.settings
        if verdict is Verdict.CLOSE:
            stats.closed_rate_limited += 1
            log.warning("client over its %s rate for %.1f s; closing the connection", kind, settings.rate_limit_close_s)
            await self.close(1008, "rate limit exceeded")
            return True
        if verdict is Verdict.NOTIFY:
            if kind == "text":
                why = f"more than {settings.max_messages_per_s} messages a second; the excess is dropped"
            else:
                why = f"audio faster than {settings.audio_realtime_factor:g}x real time; the excess is dropped"
            frames.rate_limited(why)
        return False
