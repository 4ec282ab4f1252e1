"""The per-client connection limit across real gateway processes sharing one Redis, what happens
when one of them is killed, and what a gateway process writes to its log.

Only gateways run here: the limit is decided before the WebSocket upgrade, and a conversation
opens once every stage has a live worker, so the workers are stand-in heartbeats
(tests/support/standins.py) rather than three more processes loading speech models."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.standins import standin_workers
from tests.support.ws import next_event, refused_status, wait_closed
from voicepipe.client import VoiceClient
from voicepipe.embedded import free_port

pytestmark = pytest.mark.e2e
ADMIN_KEY = "adm-" + uuid.uuid4().hex


class GatewayProcess:
    """`voicepipe gateway` as a child process, its stdout and stderr in one file."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "voicepipe", "gateway", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def wait_ready(self, timeout: float = 60) -> None:
        async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
            while True:
                assert self.process.poll() is None, self.log_path.read_text()[-3000:]
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

    async def stats(self) -> dict:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{self.port}/admin/resources/stats", headers={"X-API-Key": ADMIN_KEY})
            answer.raise_for_status()
            return answer.json()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        finally:
            self.log.close()

    def stopped_cleanly(self) -> bool:
        """SIGTERM: uvicorn shuts down, then re-raises the signal, so the exit code is -15 (or 0)."""
        code = self.stop()
        return code in (0, -signal.SIGTERM) and "Finished server process" in self.log_path.read_text()


def gateway_env(redis_url: str, namespace: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    env.update(
        VOICEPIPE_REDIS_URL=redis_url,
        VOICEPIPE_NAMESPACE=namespace,
        VOICEPIPE_CONNECTION_EVENTS_CHANNEL=f"{namespace}:connection_events",
        VOICEPIPE_TTS_CONTROL_CHANNEL=f"{namespace}:tts_control",
        VOICEPIPE_API_KEYS=ADMIN_KEY,
        PYTHONUNBUFFERED="1",
    )
    env.update({f"VOICEPIPE_{name.upper()}": value for name, value in settings.items()})
    return env


async def try_connect(url: str):
    """(websocket, None) when admitted, (None, (status, headers)) when refused before the upgrade."""
    try:
        ws = await websockets.connect(url, max_size=None, open_timeout=30)
    except websockets.InvalidStatus as refused:
        headers = {name.lower(): value for name, value in refused.response.headers.raw_items()}
        return None, (refused.response.status_code, headers)
    started = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert started["type"] == "session.started", started
    return ws, None


async def close_all(sockets) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets if ws is not None), return_exceptions=True)


@pytest.fixture
def namespace(redis_url):
    ns = f"e2e-edge-{uuid.uuid4().hex[:8]}"
    yield ns
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{ns}:*"))
    if keys:
        client.delete(*keys)
    client.close()


async def test_100_simultaneous_connects_through_two_gateways_admit_exactly_the_limit(redis_url, namespace, tmp_path):
    limit = 7
    env = gateway_env(redis_url, namespace, max_connections_per_client=str(limit), stale_timeout_s="10")
    gateways = [GatewayProcess(env, tmp_path / f"gateway-{i}.log") for i in range(2)]
    try:
        async with standin_workers(redis_url, namespace):
            await asyncio.gather(*(g.wait_ready() for g in gateways))
            outcomes = await asyncio.gather(*(try_connect(gateways[i % 2].ws_url) for i in range(100)))
            admitted = [ws for ws, _ in outcomes if ws is not None]
            refusals = [refusal for _, refusal in outcomes if refusal is not None]
            assert len(admitted) == limit
            assert len(refusals) == 100 - limit
            assert all(status == 429 and int(headers["retry-after"]) >= 1 for status, headers in refusals)
            stats = [await g.stats() for g in gateways]
            assert sum(s["connections"]["rejected_by"].get("limit", 0) for s in stats) == 100 - limit
            assert sum(s["connection_limit"]["slots_held"] for s in stats) == limit

            # nothing drifted: closing them all frees every slot, on both gateways
            await close_all(admitted)
            async with asyncio.timeout(10):
                while sum([(await g.stats())["connection_limit"]["slots_held"] for g in gateways]):
                    await asyncio.sleep(0.05)
            again = await asyncio.gather(*(try_connect(gateways[i % 2].ws_url) for i in range(limit + 3)))
            assert sum(ws is not None for ws, _ in again) == limit
            await close_all(ws for ws, _ in again)
    finally:
        clean = [g.stopped_cleanly() for g in gateways]
    assert clean == [True, True], [g.log_path.read_text()[-2000:] for g in gateways]


async def test_a_killed_gateways_connections_stop_counting_within_the_stale_timeout(redis_url, namespace, tmp_path):
    limit, stale_s = 3, 2.0
    env = gateway_env(redis_url, namespace, max_connections_per_client=str(limit), stale_timeout_s=str(stale_s))
    doomed, survivor = GatewayProcess(env, tmp_path / "doomed.log"), GatewayProcess(env, tmp_path / "survivor.log")
    try:
        async with standin_workers(redis_url, namespace):
            await asyncio.gather(doomed.wait_ready(), survivor.wait_ready())
            held = [(await try_connect(doomed.ws_url))[0] for _ in range(limit)]
            assert all(ws is not None for ws in held)
            assert (await refused_status(survivor.ws_url))[0] == 429

            doomed.process.send_signal(signal.SIGKILL)  # no finally, no cleanup, no goodbye
            doomed.process.wait(10)
            killed_at = time.monotonic()
            async with asyncio.timeout(stale_s + 10):  # bounded: the slots must stop counting
                while True:
                    ws, refusal = await try_connect(survivor.ws_url)
                    if ws is not None:
                        break
                    assert refusal[0] == 429
                    await asyncio.sleep(0.1)
            waited = time.monotonic() - killed_at
            await ws.send(json.dumps({"type": "ping"}))
            assert (await next_event(ws))["type"] == "pong"
            async with asyncio.timeout(10):  # the sweep deletes what the dead gateway left, and says so
                while (await survivor.stats())["stale_cleanup"]["connection_slots_repaired"] < limit:
                    await asyncio.sleep(0.1)
            stats = await survivor.stats()
            assert stats["stale_cleanup"]["connection_slots_repaired"] == limit
            more = [(await try_connect(survivor.ws_url))[0] for _ in range(limit - 1)]
            assert all(m is not None for m in more)  # the whole limit is available again
            assert (await refused_status(survivor.ws_url))[0] == 429
            await close_all([ws, *more, *held])
            print(f"admitted again {waited:.2f} s after the SIGKILL (STALE_TIMEOUT_S={stale_s})")
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()


async def test_a_gateway_restarted_on_the_same_port_never_counts_its_predecessors_connections(redis_url, namespace, tmp_path):
    """With a stale timeout far longer than the test: only the restart itself can free the slots."""
    limit = 2
    env = gateway_env(redis_url, namespace, max_connections_per_client=str(limit), stale_timeout_s="600")
    first = GatewayProcess(env, tmp_path / "first.log")
    restarted = None
    try:
        async with standin_workers(redis_url, namespace):
            await first.wait_ready()
            held = [(await try_connect(first.ws_url))[0] for _ in range(limit)]
            assert all(ws is not None for ws in held)
            assert (await refused_status(first.ws_url))[0] == 429
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(10)
            await close_all(held)
            restarted = GatewayProcess(env, tmp_path / "restarted.log", port=first.port)
            await restarted.wait_ready()
            async with asyncio.timeout(10):  # declared dead the moment the port was bound again
                while (await restarted.stats())["stale_cleanup"]["connection_slots_repaired"] < limit:
                    await asyncio.sleep(0.05)
            admitted = [(await try_connect(restarted.ws_url))[0] for _ in range(limit)]
            assert all(ws is not None for ws in admitted)
            stats = await restarted.stats()
            assert stats["stale_cleanup"]["connection_slots_repaired"] == limit
            assert (await refused_status(restarted.ws_url))[0] == 429  # and the limit still holds
            await close_all(admitted)
    finally:
        first.stop(signal.SIGKILL)
        if restarted is not None:
            assert restarted.stopped_cleanly()


async def test_no_secret_reaches_the_gateways_log(redis_url, namespace, tmp_path):
    token, wrong = "tok-" + uuid.uuid4().hex, "guess-" + uuid.uuid4().hex
    env = gateway_env(redis_url, namespace, client_tokens=f"{token},other-{uuid.uuid4().hex}", log_level="DEBUG")
    gateway = GatewayProcess(env, tmp_path / "gateway.log")
    resume_tokens: list[str] = []
    try:
        async with standin_workers(redis_url, namespace):
            await gateway.wait_ready()
            async with VoiceClient(gateway.ws_url, token=token, token_in="query") as client:
                cid = client.session["conversation_id"]
                resume_tokens.append(client.session["resume_token"])
            for place in ("header", "subprotocol"):
                url = f"{gateway.ws_url}?conversation_id={cid}&resume_token={resume_tokens[-1]}"
                async with VoiceClient(url, token=token, token_in=place) as client:
                    assert client.session["resumed"]
                    resume_tokens.append(client.session["resume_token"])
            used = await websockets.connect(
                f"{gateway.ws_url}?token={token}&conversation_id={cid}&resume_token={resume_tokens[0]}"
            )
            assert await wait_closed(used) == 4404  # an old resume token, refused
            assert (await refused_status(f"{gateway.ws_url}?token={wrong}"))[0] == 403
            assert (await refused_status(gateway.ws_url, additional_headers={"Authorization": f"Bearer {wrong}"}))[0] == 403
            assert (await refused_status(gateway.ws_url, subprotocols=["voicepipe.v1", f"token.{wrong}"]))[0] == 403
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http:
                assert (await http.get("/admin/resources/stats", headers={"X-API-Key": ADMIN_KEY})).status_code == 200
                assert (await http.get("/admin/workers", headers={"X-API-Key": wrong})).status_code == 401
    finally:
        assert gateway.stopped_cleanly()
    log = gateway.log_path.read_text()
    assert '"WebSocket /v1/ws?token=***' in log  # uvicorn's handshake lines are there, redacted
    assert "resume_token=***" in log
    assert "token.***" in log  # websockets' DEBUG lines of request headers, redacted
    for secret in [token, wrong, ADMIN_KEY, *resume_tokens]:
        assert secret not in log, f"a secret is in the log: {secret[:6]}…"
    assert "Traceback" not in log
