"""Start (or reuse) a voicepipe stack for a benchmark."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

from shared.percentiles import percentile as shared_percentile
from voicepipe.embedded import free_port


@contextlib.contextmanager
def running_stack(url: str | None, env: dict[str, str] | None = None, with_pid: bool = False) -> Iterator:
    """Yields the stack's http URL (and the `voicepipe up` pid with `with_pid`): `url` if given,
    else a fresh `voicepipe up` with embedded defaults."""
    if url:
        yield (url.rstrip("/"), None) if with_pid else url.rstrip("/")
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, log = launch([sys.executable, "-m", "voicepipe", "up", "--port", str(port)], f"{base}/readyz", "stack", env, 300)
    try:
        print(f"# stack up at {base} (log: {log})", flush=True)
        yield (base, process.pid) if with_pid else base
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def launch(
    argv: list[str], ready_url: str, what: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `argv` (its output in a log file of its own) and wait until `ready_url` answers 200;
    returns the process and its log's path. Raises, the process stopped, if it exits or is not
    ready within `timeout_s`."""
    log = tempfile.NamedTemporaryFile(prefix=f"voicepipe-bench-{what}-", suffix=".log", delete=False)
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{what} did not start; see {log.name}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return process, log.name
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile for printing; NaN when there are no values."""
    value = shared_percentile(values, q)
    return float("nan") if value is None else value
