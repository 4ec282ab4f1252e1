"""uvicorn's WebSocket protocol, telling the app when a socket died of a keepalive ping timeout.

uvicorn reports every lost connection as code 1005; a half-open client (gone without a close
frame, noticed only because pings go unanswered) must end with reason `timeout`, so this protocol
puts a disconnect marked with `KEEPALIVE_TIMEOUT` ahead of uvicorn's own."""
from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

KEEPALIVE_TIMEOUT = "keepalive ping timeout"


class KeepaliveAwareProtocol(WebSocketsSansIOProtocol):
    _keepalive_expired = False

    def keepalive_timeout(self) -> None:
        self._keepalive_expired = True
        super().keepalive_timeout()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive_expired:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006, "reason": KEEPALIVE_TIMEOUT})
        super().connection_lost(exc)
