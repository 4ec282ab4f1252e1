"""`python -m gateway` / `voicepipe gateway`: the gateway process under uvicorn."""
from __future__ import annotations

import logging

import uvicorn
from redis.exceptions import RedisError

from gateway.app import create_app
from gateway.keepalive import KeepaliveAwareProtocol
from shared.config import Settings
from shared.logging import setup_logging

log = logging.getLogger("voicepipe.gateway")


class GatewayServer(uvicorn.Server):
    """Closes client sockets with 1001 before uvicorn tears connections down, so every session
    publishes its disconnect event during shutdown; and, once its port is bound, tells the
    connection limits that whichever gateway listened there before is gone (gateway/limits.py)."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        gateway = getattr(self.config.app.state, "gateway", None)
        if gateway is None or self.should_exit or not getattr(self, "servers", None):
            return
        bound = [s.getsockname() for server in self.servers for s in (server.sockets or ())]
        ports = {address[1] for address in bound if isinstance(address, tuple) and len(address) >= 2}
        for port in sorted(ports):
            try:
                await gateway.limits.claim_endpoint(port)
            except (RedisError, OSError) as exc:
                log.warning("could not register this gateway's address for the connection limits: %s", exc)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # stop taking new connections first
        gateway = getattr(self.config.app.state, "gateway", None)
        if gateway is not None:
            await gateway.close_conversations(1001, "server shutting down")
        await super().shutdown(sockets)


def build_server(settings: Settings, host: str | None = None, port: int | None = None) -> GatewayServer:
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        ws=KeepaliveAwareProtocol,
        ws_max_size=settings.max_audio_frame_bytes,
        ws_per_message_deflate=False,  # PCM does not compress: deflate only burns CPU on both ends of every frame
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        log_config=None,
        access_log=False,
        # uvicorn would take X-Forwarded-For from 127.0.0.1 by default; TRUSTED_PROXIES decides alone
        # whose forwarded address counts (gateway/auth.py), so the client is always the TCP peer here
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    return GatewayServer(config)


def main(settings: Settings | None = None, host: str | None = None, port: int | None = None) -> None:
    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_format, "gateway", secrets=settings.secret_values())
    build_server(settings, host, port).run()


if __name__ == "__main__":
    main()
