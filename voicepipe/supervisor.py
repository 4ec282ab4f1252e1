"""`voicepipe up`: the whole stack on one machine, every child supervised.

Start order: Redis (embedded unless VOICEPIPE_REDIS_URL), LLM server (embedded unless
VOICEPIPE_LLM_BASE_URL), the three workers, the gateway. Stop order is the reverse. A child that
dies is restarted (at most 3 times a minute); Ctrl-C or SIGTERM stops everything.

With VOICEPIPE_METRICS_PORT set, the workers serve their /metrics on it and the next two ports
(vad_stt, llm, tts), since one port can be bound by one process only; unset, they serve none.

Startup fails fast: a child that exits before the stack is ready stops everything at once, and the
supervisor exits 1 with that child's name and its last lines. The console carries voicepipe's own
lines (the workers' and the gateway's logs, read through pipes and re-printed line by line, with a
small ring buffer of each one's last lines for that report); the embedded Redis and LLM server
write to files in a run directory (embedded.run_dir) whose path is printed at start and in the
ready banner."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import redis.asyncio as aioredis

from shared.config import Settings
from shared.logging import redact_url
from shared.priority import deprioritize
from voicepipe import embedded

log = logging.getLogger("voicepipe.up")

TAIL_LINES = 20  # a child's last lines in the report of its death during startup
MAX_LINE_BYTES = 64 * 1024  # a longer line without a newline is passed on in pieces
READ_CHUNK = 64 * 1024
DRAIN_TIMEOUT_S = 5.0  # how long a stopped child's pipes may take to reach end of file


class LineSplitter:
    """Cuts a byte stream into whole lines (newline kept): the console gets only whole lines, so
    two children's output never interleaves within a line, and nothing is held back once its
    newline has arrived."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        end = self._partial.rfind(b"\n") + 1
        if end == 0 and len(self._partial) >= self.max_line:
            end = len(self._partial)  # no newline in sight: pass it on rather than grow without bound
        if end == 0:
            return []
        chunk = bytes(self._partial[:end])
        del self._partial[:end]
        return chunk.splitlines(keepends=True)

    def close(self) -> list[bytes]:
        """At end of file: the last line even without its newline."""
        if not self._partial:
            return []
        rest = bytes(self._partial) + b"\n"
        self._partial.clear()
        return [rest]


def tail_lines(path: Path, n: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """The last n lines of a log file (read from its end; a missing file has none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return lines[-n:] if n > 0 else []


def _write(out: IO[str], data: bytes) -> None:
    try:
        out.flush()  # whatever the supervisor's own logging wrote goes first
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            out.write(data.decode("utf-8", "replace"))
            out.flush()
    except (OSError, ValueError):
        pass  # a closed console must not stop the draining (the child would block on a full pipe)


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
    log_path: Path | None = None  # set: stdout and stderr go to this file; unset: re-printed on the console
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pumps: list[asyncio.Task] = field(default_factory=list)

    async def start(self) -> None:
        preexec = _inference_child(self.nice, self.idle) if self.nice or self.idle else _die_with_parent
        if self.log_path is not None:
            with open(self.log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, env=self.env, start_new_session=True, preexec_fn=preexec,
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                )
        else:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, start_new_session=True, preexec_fn=preexec,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            self.pumps = [
                asyncio.create_task(self._pump(self.process.stdout, sys.stdout)),
                asyncio.create_task(self._pump(self.process.stderr, sys.stderr)),
            ]
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def _pump(self, stream: asyncio.StreamReader, out: IO[str]) -> None:
        """Re-prints a child's output line by line as it comes, keeping its last lines."""
        splitter = LineSplitter()
        while True:
            data = await stream.read(READ_CHUNK)  # returns as soon as anything is there
            lines = splitter.feed(data) if data else splitter.close()
            if lines:
                self.tail.extend(line.decode("utf-8", "replace").rstrip("\r\n") for line in lines)
                _write(out, b"".join(lines))
            if not data:
                return

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Waits for the pipes of an exited child to reach end of file, so no line is lost."""
        pumps, self.pumps = self.pumps, []
        if not pumps:
            return
        _, pending = await asyncio.wait(pumps, timeout=timeout)
        for task in pending:  # a grandchild holds the pipe open: give up on it
            task.cancel()

    def last_lines(self, n: int = TAIL_LINES) -> list[str]:
        if self.log_path is not None:
            return tail_lines(self.log_path, n)
        return list(self.tail)[-n:] if n > 0 else []

    def failure_report(self, when: str) -> str:
        code = self.process.returncode if self.process is not None else None
        lines = self.last_lines()
        where = f" ({self.log_path})" if self.log_path is not None else ""
        head = f"{self.name} exited with code {code} {when}".rstrip()
        if not lines:
            return f"{head}; it wrote nothing{where}"
        body = "\n".join(f"  | {line}" for line in lines)
        return f"{head}; its last {len(lines)} lines{where}:\n{body}"

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            await self.drain()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            proc.kill()
            await proc.wait()
        finally:
            await self.drain()


class ChildDied(RuntimeError):
    def __init__(self, child: Child) -> None:
        super().__init__(child.name)
        self.child = child


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.children: list[Child] = []
        self.stopping = False
        self.run_dir: Path | None = None  # the embedded services' log files

    def _log_file(self, name: str) -> Path:
        if self.run_dir is None:
            self.run_dir = embedded.run_dir()
            log.info("the embedded services log to %s", self.run_dir)
        return self.run_dir / f"{name}.log"

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
                log_path = self._log_file("redis")
                workdir = self.run_dir / "redis"
                workdir.mkdir(exist_ok=True)
                await self._start(Child("redis", embedded.redis_argv(port, str(workdir)), self._env(), log_path=log_path))
                env_extra["VOICEPIPE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                await self._wait_for(lambda: _redis_ok(env_extra["VOICEPIPE_REDIS_URL"]), "redis", 20)
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
                        log_path=self._log_file("llm-server"),
                    )
                )
                env_extra["VOICEPIPE_LLM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
                if "llm_scheduling" not in self.settings.model_fields_set:  # an explicit setting wins
                    env_extra.update(embedded.llm_env())
                await self._wait_for(lambda: _http_ok(env_extra["VOICEPIPE_LLM_BASE_URL"] + "/models"), "llm-server", 120)
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
            await self._wait_for(lambda: _http_ok(f"http://{shown_host}:{self.port}/readyz"), "the pipeline", 180)
            logs_note = (
                f"\nlogs: the workers and the gateway log here; the embedded services to {self.run_dir}"
                if self.run_dir is not None
                else "\nlogs: every process logs here"
            )
            print(
                f"voicepipe is ready: open http://{shown_host}:{self.port}  (Ctrl-C stops everything){admin_note}{logs_note}",
                flush=True,
            )
            return await self._watch()
        except asyncio.CancelledError:
            return 0
        except ChildDied as died:
            await died.child.drain(timeout=2.0)  # its last lines, up to its end
            log.error("stopping the stack: %s", died.child.failure_report("during startup"))
            return 1
        except (RuntimeError, TimeoutError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            await self.stop()

    async def _start(self, child: Child) -> None:
        self.children.append(child)
        await child.start()

    def _dead_child(self) -> Child | None:
        for child in self.children:
            if child.process is not None and child.process.returncode is not None:
                return child
        return None

    async def _wait_for(self, check, what: str, timeout: float, poll_s: float = 0.2) -> None:
        """Waits for `check` to pass, but gives up the moment any child exits (even in the middle of
        a check that is waiting for its own timeout)."""
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children if c.process is not None}
        try:
            deadline = time.monotonic() + timeout
            while True:
                dead = self._dead_child()
                if dead is not None:
                    raise ChildDied(dead)
                checking = asyncio.ensure_future(check())
                done, _ = await asyncio.wait({checking, *waits}, return_when=asyncio.FIRST_COMPLETED)
                if checking not in done:
                    checking.cancel()
                    await asyncio.gather(checking, return_exceptions=True)
                    raise ChildDied(waits[next(iter(done))])
                if checking.result():
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{what} did not become ready within {timeout:.0f} s")
                done, _ = await asyncio.wait(waits, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    raise ChildDied(waits[next(iter(done))])
        finally:
            for fut in waits:
                fut.cancel()

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
                await child.drain(timeout=2.0)
                if len(child.restarts) >= 3 or child.name in ("redis",):
                    why = "and cannot be restarted" if child.name == "redis" else "for the 4th time in a minute"
                    log.error("stopping the stack: %s", child.failure_report(why))
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
