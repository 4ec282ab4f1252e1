"""The WebSocket handshake of `/v1/ws` (docs/protocol.md §1 "Connecting"): everything decided
before the upgrade.

A refused client gets an HTTP answer instead of `101 Switching Protocols`: 403 for a missing or
wrong token or an Origin not allowed, 429 with `Retry-After` over `MAX_CONNECTIONS_PER_CLIENT`,
503 while Redis is unreachable (shared/bus_health.py: known at once, no round trip) or cannot
count connections. That is the ASGI "websocket.http.response" extension
(uvicorn supports it); a refusal before the upgrade costs no WebSocket state, tells HTTP-aware
clients and proxies exactly what happened, and browsers see a failed handshake rather than a socket
that opens and dies. Only a server without the extension gets the fallback: accept, then close with
1008 (refused) or 1013 (limit). Refusal bodies and close reasons never quote client input.

Order: token, then origin (both local and cheap), then the limit (a Redis round trip), so a client
without a valid token cannot make the gateway touch Redis at all."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway import auth
from gateway.hub import Gateway
from gateway.limits import LimitReached, Slot

log = logging.getLogger("voicepipe.gateway.handshake")

DENIAL_EXTENSION = "websocket.http.response"
CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason is at most 123 bytes of UTF-8


def close_reason(text: str) -> str:
    """`text` cut to what fits in a close frame (whole UTF-8 characters only)."""
    return text.encode("utf-8", "replace")[:CLOSE_REASON_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Admission:
    """What the handshake decided for an accepted client."""

    identity: auth.ClientIdentity
    slot: Slot | None  # the counted connection, released when the socket ends (None: no limit)
    subprotocol: str | None  # the endpoint's own subprotocol, when the client offered it


async def admit(gateway: Gateway, websocket: WebSocket, correlation_id: str, subprotocol: str) -> Admission | None:
    """Decide on the client before the upgrade; None when it was refused (and has been answered).
    `subprotocol` is the one the endpoint answers with when offered (`voicepipe.v1`, `realtime`)."""
    scope = websocket.scope
    headers = scope["headers"]
    settings = gateway.settings
    token = None
    if gateway.client_tokens:
        presented = auth.presented_tokens(
            websocket.query_params.get("token"),
            auth.header_value(headers, b"authorization"),
            scope.get("subprotocols", ()),
        )
        token = auth.valid_client_token(presented, gateway.client_tokens)
        if token is None:
            await deny(gateway, websocket, correlation_id, 403, "forbidden", "missing or invalid token", "token")
            return None
    if not auth.origin_allowed(auth.header_value(headers, b"origin"), settings.allowed_origins):
        await deny(gateway, websocket, correlation_id, 403, "forbidden", "origin not allowed", "origin")
        return None
    if not gateway.bus_health.up:
        await deny(
            gateway, websocket, correlation_id, 503, "bus_unavailable", "the server cannot take connections now",
            "bus_unavailable", retry_after_s=1,
        )
        return None
    client = scope.get("client")
    address = auth.client_address(
        client[0] if client else None, auth.header_value(headers, b"x-forwarded-for"), gateway.trusted_proxies
    )
    identity = auth.ClientIdentity.of(token, address)
    slot = None
    if gateway.limits.enabled:
        try:
            slot = await gateway.limits.acquire(identity)
        except LimitReached as exc:
            log.info("connection refused: %s has %d connections open (limit %d)", identity.label, exc.live, gateway.limits.limit)
            await deny(
                gateway, websocket, correlation_id, 429, "too_many_connections",
                f"at most {gateway.limits.limit} connections per client",
                "limit", retry_after_s=gateway.limits.retry_after_s,
            )
            return None
        except (RedisError, OSError) as exc:
            log.warning("cannot count connections (Redis): %s", exc)
            await deny(
                gateway, websocket, correlation_id, 503, "bus_unavailable", "the server cannot take connections now",
                "bus_unavailable", retry_after_s=1,
            )
            return None
    offered = scope.get("subprotocols") or ()
    return Admission(identity, slot, subprotocol if subprotocol in offered else None)


async def deny(
    gateway: Gateway,
    websocket: WebSocket,
    correlation_id: str,
    status: int,
    code: str,
    message: str,
    why: str,
    *,
    retry_after_s: int | None = None,
) -> None:
    """Refuse the handshake with an HTTP response, or (without the extension) accept and close."""
    gateway.reject(why)
    if why != "limit":
        log.info("connection refused: %s", message)
    headers = {"X-Correlation-ID": correlation_id}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    if DENIAL_EXTENSION in websocket.scope.get("extensions", {}):
        body = json.dumps({"error": {"code": code, "message": message}})
        await websocket.send_denial_response(
            Response(body, status_code=status, headers=headers, media_type="application/json")
        )
        return
    await websocket.accept()
    await websocket.close(1013 if status in (429, 503) else 1008, close_reason(message))
