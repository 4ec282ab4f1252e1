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
    log = tempfile.NamedTemporaryFile(prefix="voicepipe-bench-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "voicepipe", "up", "--port", str(port)],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stack did not start; see {log.name}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        print(f"# stack up at {base} (log: {log.name})", flush=True)
        yield (base, process.pid) if with_pid else base
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile for printing; NaN when there are no values."""
    value = shared_percentile(values, q)
    return float("nan") if value is None else value
