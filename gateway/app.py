"""The FastAPI application: routes, correlation ids, and the gateway's life."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import admin, audio_api, metrics
from gateway.correlation import correlation_id as correlation_id_of
from gateway.hub import Gateway
from gateway.realtime import serve_realtime
from gateway.voicepipe_ws import serve_client
from shared.bus import create_redis
from shared.config import Settings
from shared.logging import log_context
from shared.stages import Stage

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("voicepipe.gateway")


class CorrelationIdMiddleware:
    """Every HTTP response carries X-Correlation-ID: the caller's if valid (gateway/correlation.py),
    else a new UUID4. WebSocket handshakes take theirs in gateway/voicepipe_ws.py and gateway/realtime.py."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        correlation_id = correlation_id_of(scope["headers"])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Correlation-ID"] = correlation_id
            await send(message)

        with log_context(correlation_id=correlation_id):
            await self.app(scope, receive, send_with_id)


def create_app(settings: Settings, client: aioredis.Redis | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis_client = client or create_redis(settings.redis_url_or_default, settings.redis_max_connections, name="gateway")
        gateway = Gateway(settings, redis_client)
        app.state.gateway = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()
            if client is None:
                await redis_client.aclose()

    app = FastAPI(title="voicepipe gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        gateway: Gateway = app.state.gateway
        if not gateway.bus_health.up:  # known at once: no need to wait for a PING to time out
            return JSONResponse({"status": "not_ready", "missing": ["redis"]}, status_code=503)
        try:
            async with asyncio.timeout(1):
                await gateway.redis.ping()
                await gateway.directory.refresh()
        except Exception as exc:  # the answer names what is missing; the why (maybe a URL) stays in the log
            log.warning("readiness: Redis does not answer: %s", type(exc).__name__)
            return JSONResponse({"status": "not_ready", "missing": ["redis"]}, status_code=503)
        workers = {stage: len(found) for stage, found in gateway.directory.workers.items()}
        missing = gateway.directory.missing()
        orchestrators = gateway.directory.workers[Stage.LLM]
        if orchestrators and all(w.llm_ok is False for w in orchestrators):
            missing.append("llm_server")  # no live orchestrator reaches its LLM server
        if missing:
            answer = {"status": "not_ready", "missing": missing, "workers": workers}
            if "llm_server" in missing:
                answer["detail"] = "llm unreachable"
            return JSONResponse(answer, status_code=503)
        return JSONResponse({"status": "ready", "workers": workers})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(app.state.gateway.metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    app.include_router(admin.router)
    app.include_router(audio_api.router)

    @app.websocket("/v1/ws")
    async def client_socket(websocket: WebSocket) -> None:
        await serve_client(app.state.gateway, websocket)

    @app.websocket("/v1/realtime")
    async def realtime_socket(websocket: WebSocket) -> None:
        await serve_realtime(app.state.gateway, websocket)

    return app
