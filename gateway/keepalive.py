"""uvicorn's WebSocket protocol, with what the app needs from the connection underneath and two
fixes of uvicorn's websockets-sansio implementation (uvicorn 0.54) at the edge.

1. Keepalive timeouts: uvicorn reports every lost connection as code 1005; a half-open client
   (gone without a close frame, noticed only because pings go unanswered) must end with reason
   `timeout`, so this protocol puts a disconnect marked with `KEEPALIVE_TIMEOUT` ahead of uvicorn's
   own.
2. A deadline for the TCP connection: a client that stopped reading cannot take a close frame (its
   TCP window is full), and a transport closed gracefully waits for its buffer to drain, which for
   such a client is forever. The scope extension `ABORT_AFTER_EXTENSION` lets the session arm a
   timer that aborts the connection unless it has ended by then. A timer on the connection, not a
   task: it dies with the connection, whoever ends first.
3. A quiet refusal: after a handshake is denied with an HTTP response (the "websocket.http.response"
   extension, gateway/handshake.py), uvicorn's sansio implementation never marks the handshake
   complete, so it logs "ASGI callable returned without completing handshake." at ERROR for every
   refused client (Kludex/uvicorn PR #3138, open at the time of writing). The response is on the
   wire once its last body part is sent; mark it so there, as uvicorn's wsproto implementation does.
4. An answer to a handshake websockets cannot parse: for a header line over 8 KiB, too many
   headers or a request line too long, websockets writes its own 431/414 (or EOF) into its send
   buffer, but uvicorn never flushes it, so the client hangs until it gives up and server shutdown
   later trips an assertion with a traceback. Flush it and close.
5. A bound on pongs: every client ping makes uvicorn write a pong straight to the transport,
   outside the write flow control the app's frames obey, so a client that pings without reading
   grew the gateway's memory without limit (40 MB of pings: +29 MB). App frames wait for the
   transport to drain, so its buffer stays near its 64 KiB high-water mark; a peer that has left
   more than PONG_BACKLOG_BYTES of our writes unread and still pings is dropped.
6. A text frame that is not UTF-8 closes the socket with 1007 (RFC 6455), as uvicorn does, but
   with one INFO line instead of uvicorn's ERROR and traceback: any client could otherwise fill
   the logs with tracebacks and trip every ERROR alert at will.
7. The app picks the subprotocol: websockets parses `Sec-WebSocket-Protocol` itself and answers
   400 when an entry is not an HTTP token (a non-ASCII `token.<T>`), before the app can say 403
   like for any wrong token. That parsing only validates (the protocol object is given no
   subprotocols to choose from), and uvicorn hands the app the offered entries from the raw
   header anyway, so it is skipped: the gateway's handshake judges every entry (gateway/auth.py)."""
from __future__ import annotations

import asyncio

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

KEEPALIVE_TIMEOUT = "keepalive ping timeout"
PONG_BACKLOG_BYTES = 1024 * 1024  # unread bytes we hold for a peer before its pings drop it
ABORT_AFTER_EXTENSION = "voicepipe.abort_after"  # scope["extensions"][...](seconds)


def _no_subprotocol(headers: object) -> None:
    return None


class KeepaliveAwareProtocol(WebSocketsSansIOProtocol):
    _keepalive_expired = False
    _abort_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn.process_subprotocol = _no_subprotocol  # 7: the app decides, from scope["subprotocols"]

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake itself was refused
        if scope is not None:  # the app's task has not run yet, so it sees the extension
            scope["extensions"][ABORT_AFTER_EXTENSION] = self.abort_after

    def abort_after(self, seconds: float) -> None:
        """Drop the TCP connection in `seconds` unless it has ended by then."""
        if self._abort_timer is None and not self.disconnected:
            self._abort_timer = self.loop.call_later(seconds, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self.disconnected:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and not self.close_sent and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_complete = True
            self.close_sent = True
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()  # frames are at most MAX_AUDIO_FRAME_BYTES (64 KiB)
            except UnicodeDecodeError:
                self.frames = []
                self.logger.info("a WebSocket text frame was not UTF-8; closing with 1007")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        if self.transport.get_write_buffer_size() > PONG_BACKLOG_BYTES:
            self.transport.abort()  # not reading, still pinging: every pong would only pile up
            return
        super().handle_ping()

    async def send(self, message) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def keepalive_timeout(self) -> None:
        self._keepalive_expired = True
        super().keepalive_timeout()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._keepalive_expired:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006, "reason": KEEPALIVE_TIMEOUT})
        super().connection_lost(exc)
