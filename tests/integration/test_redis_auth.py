"""A Redis with a password, and one behind TLS: every URL form works, and the password is in no log.

The in-process stack covers the three password forms; a gateway and an orchestrator run as real
processes too (`voicepipe gateway`, `voicepipe worker llm`, at DEBUG), since those print their
Redis URL at startup, and their whole output is searched for the password."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from shared.bus import create_redis
from shared.logging import redact_url
from tests.conftest import make_settings
from tests.support.admin import admin_get
from tests.support.redis_server import RedisProcess
from tests.support.stack import run_stack, wait_ready
from tests.support.ws import collect_until, connect
from voicepipe.embedded import free_port
from workers.runtime import Worker
from workers.tts.handler import TtsWorker
from workers.vad_stt.handler import VadSttWorker

PASSWORD = f"pw-{uuid.uuid4().hex}"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def passworded_redis():
    server = RedisProcess("--requirepass", PASSWORD)
    yield server
    server.stop()


def url_forms(port: int) -> dict[str, str]:
    return {
        "userinfo": f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        "user-and-password": f"redis://default:{PASSWORD}@127.0.0.1:{port}/0",
        "query": f"redis://127.0.0.1:{port}/0?password={PASSWORD}",
    }


async def typed_turn(ws_url: str) -> dict:
    ws, _ = await connect(ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "text.input", "text": "Are you there?"}))
        events, audio = await collect_until(ws, "response.done", timeout=60)
    assert audio and events[-1]["text"]
    return events[-1]


@pytest.mark.parametrize("form", ["userinfo", "user-and-password", "query"])
async def test_a_passworded_redis_works_and_the_password_is_never_logged(
    passworded_redis, form, transcriber, voice, fake_llm, caplog
):
    caplog.set_level(logging.DEBUG)
    url = url_forms(passworded_redis.port)[form]
    settings = make_settings(url)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        await typed_turn(stack.ws_url)
        pools = await admin_get(stack, "/admin/resources/pools")
    assert PASSWORD not in json.dumps(pools) and "***" in pools["redis"]["url"]
    assert caplog.records and PASSWORD not in caplog.text


async def test_a_wrong_password_is_refused_without_showing_either(passworded_redis, caplog):
    from redis.exceptions import AuthenticationError

    caplog.set_level(logging.DEBUG)
    client = create_redis(f"redis://:wrong-{PASSWORD}@127.0.0.1:{passworded_redis.port}/0")
    with pytest.raises(AuthenticationError) as refused:
        await client.ping()
    await client.aclose()
    assert PASSWORD not in str(refused.value) and PASSWORD not in caplog.text


def _env(settings, url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEPIPE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        VOICEPIPE_REDIS_URL=url,
        VOICEPIPE_NAMESPACE=settings.namespace,
        VOICEPIPE_CONNECTION_EVENTS_CHANNEL=settings.connection_events_channel,
        VOICEPIPE_TTS_CONTROL_CHANNEL=settings.tts_control_channel,
        VOICEPIPE_HEARTBEAT_INTERVAL_S=str(settings.heartbeat_interval_s),
        VOICEPIPE_WORKER_TTL_S=str(settings.worker_ttl_s),
        VOICEPIPE_HEALTH_LOG_INTERVAL_S="0",
        VOICEPIPE_LOG_LEVEL="DEBUG",
        **extra,
    )
    return env


@pytest.mark.parametrize("form", ["userinfo", "query"])
async def test_gateway_and_worker_processes_on_a_passworded_redis_log_no_password(
    passworded_redis, form, transcriber, voice, fake_llm, tmp_path
):
    """Real processes: the gateway and the orchestrator; VAD/STT and TTS in this process (their
    models are loaded here once). A typed turn through the gateway process proves they all talk."""
    url = url_forms(passworded_redis.port)[form]
    settings = make_settings(url)
    port = free_port()
    env = _env(settings, url, VOICEPIPE_LLM_BASE_URL=fake_llm.base_url)
    logs = {name: tmp_path / f"{name}.log" for name in ("gateway", "llm")}
    argv = {
        "gateway": [sys.executable, "-m", "voicepipe", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        "llm": [sys.executable, "-m", "voicepipe", "worker", "llm"],
    }
    processes: dict[str, subprocess.Popen] = {}
    clients = [create_redis(url), create_redis(url)]
    local: list[Worker] = [
        VadSttWorker(settings, clients[0], transcriber=transcriber),
        TtsWorker(settings, clients[1], voice=voice),
    ]
    tasks = [asyncio.create_task(w.run(), name=f"test-{w.stage}") for w in local]
    try:
        for name, cmd in argv.items():
            with open(logs[name], "wb") as out:
                processes[name] = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        http_url = f"http://127.0.0.1:{port}"
        await wait_ready(http_url, timeout=60)
        await typed_turn(f"ws://127.0.0.1:{port}/v1/ws")
        async with httpx.AsyncClient() as client:
            ready = (await client.get(f"{http_url}/readyz")).json()
        assert ready["status"] == "ready"
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=15)
        for client in clients:
            await client.aclose()
    for name, path in logs.items():
        text = path.read_text(errors="replace")
        assert PASSWORD not in text, f"the password is in the {name} log"
        assert f"on {redact_url(url)}" in text  # the URL is logged, masked


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and a system redis-server")
    key, cert = _self_signed_cert(tmp_path_factory.mktemp("tls"))
    try:
        server = RedisProcess(
            "--requirepass", PASSWORD, "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
            tls=True,
        )
    except RuntimeError as exc:  # a redis-server built without TLS refuses the --tls-* options
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    yield server, cert
    server.stop()


async def test_rediss_with_a_password_works_and_is_never_logged(tls_redis, transcriber, voice, fake_llm, caplog):
    server, cert = tls_redis
    caplog.set_level(logging.DEBUG)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"
    settings = make_settings(url)
    async with run_stack(settings, transcriber=transcriber, voice=voice, llm_base_url=fake_llm.base_url) as stack:
        await typed_turn(stack.ws_url)
        pools = await admin_get(stack, "/admin/resources/pools")
    assert pools["redis"]["url"].startswith("rediss://:***@")
    assert PASSWORD not in caplog.text


async def test_rediss_refuses_a_server_it_cannot_verify(tls_redis):
    """Certificates are checked: without the CA the connection fails (no silent downgrade)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    server, _cert = tls_redis
    client = create_redis(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0")
    with pytest.raises(RedisConnectionError):
        await client.ping()
    await client.aclose()
