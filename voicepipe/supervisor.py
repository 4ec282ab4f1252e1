"""`voicepipe up`: the whole stack on one machine, every child supervised.

Start order: Redis (embedded unless VOICEPIPE_REDIS_URL), LLM server (embedded unless
VOICEPIPE_LLM_BASE_URL), the three workers, the gateway. Stop order is the reverse. A child that
dies is restarted (at most 3 times a minute); Ctrl-C or SIGTERM stops everything.

With VOICEPIPE_METRICS_PORT set, the workers serve their /metrics on it and the next two ports
(vad_stt, llm, tts), since one port can be bound by one process only; unset, they serve none."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis

from shared.config import Settings
from shared.logging import redact_url
from shared.priority import deprioritize
from voicepipe import embedded

log = logging.getLogger("voicepipe.up")


def _die_with_parent() -> None:
    """Children get SIGTERM if the supervisor itself is killed (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _inference_child(nice: int, idle: bool):
    """preexec_fn for a process that is all model compute (the LLM server)."""

    def prepare() -> None:
        _die_with_parent()
        deprioritize(0, nice, idle)

    return prepare


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    nice: int = 0
    idle: bool = False

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            start_new_session=True,
            preexec_fn=_inference_child(self.nice, self.idle) if self.nice or self.idle else _die_with_parent,
        )
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            proc.kill()
            await proc.wait()


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.children: list[Child] = []
        self.stopping = False

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra)
        return env

    async def run(self) -> int:
        env_extra: dict[str, str] = {}
        admin_note = ""
        if not self.settings.api_keys:
            env_extra["VOICEPIPE_API_KEYS"] = secrets.token_urlsafe(18)
            admin_note = f"\nadmin API key for this run: {env_extra['VOICEPIPE_API_KEYS']} (set VOICEPIPE_API_KEYS to choose one)"
        try:
            if not self.settings.redis_url:
                port = embedded.free_port()
                await self._start(Child("redis", embedded.redis_argv(port), self._env()))
                env_extra["VOICEPIPE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                await _wait_for(lambda: _redis_ok(env_extra["VOICEPIPE_REDIS_URL"]), "redis", 20)
            log.info("bus: %s", redact_url(env_extra.get("VOICEPIPE_REDIS_URL") or self.settings.redis_url_or_default))
            if not self.settings.llm_base_url and not self.settings.null_mode:  # null mode needs no model
                port = embedded.free_port()
                llm_server = embedded.llm_argv(port, self.settings.llm_model)
                await self._start(
                    Child(
                        "llm-server",
                        llm_server,
                        self._env(),
                        nice=self.settings.inference_nice,
                        idle=self.settings.inference_idle,
                    )
                )
                env_extra["VOICEPIPE_LLM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
                await _wait_for(lambda: _http_ok(env_extra["VOICEPIPE_LLM_BASE_URL"] + "/models"), "llm-server", 120)
            python = sys.executable
            for offset, stage in enumerate(("vad_stt", "llm", "tts")):
                argv = [python, "-m", "voicepipe", "worker", stage]
                ports = {}
                if self.settings.metrics_port:  # one machine: each worker's /metrics on a port of its own
                    ports["VOICEPIPE_METRICS_PORT"] = str(self.settings.metrics_port + offset)
                await self._start(Child(f"worker-{stage}", argv, self._env(**env_extra, **ports)))
            gateway_argv = [python, "-m", "voicepipe", "gateway", "--host", self.host, "--port", str(self.port)]
            await self._start(Child("gateway", gateway_argv, self._env(**env_extra)))
            shown_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
            await _wait_for(lambda: _http_ok(f"http://{shown_host}:{self.port}/readyz"), "the pipeline", 180)
            print(f"voicepipe is ready: open http://{shown_host}:{self.port}  (Ctrl-C stops everything){admin_note}", flush=True)
            return await self._watch()
        except asyncio.CancelledError:
            return 0
        except (RuntimeError, TimeoutError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            await self.stop()

    async def _start(self, child: Child) -> None:
        self.children.append(child)
        await child.start()

    async def _watch(self) -> int:
        while True:
            waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
            try:
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in waits:
                    fut.cancel()
            for fut in done:
                child = waits[fut]
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60]
                if len(child.restarts) >= 3 or child.name in ("redis",):
                    log.error("%s exited with %s; stopping the stack", child.name, child.process.returncode)
                    return 1
                log.warning("%s exited with %s; restarting it", child.name, child.process.returncode)
                child.restarts.append(now)
                await asyncio.sleep(0.5)
                await child.start()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for child in reversed(self.children):
            await child.stop()
        log.info("all processes stopped")


async def _redis_ok(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def _http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def _wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f} s")


def up(settings: Settings, host: str, port: int) -> int:
    async def main() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await Supervisor(settings, host, port).run()
        except asyncio.CancelledError:
            return 0

    return asyncio.run(main())
