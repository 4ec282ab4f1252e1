"""The embedded LLM server (voicepipe.llm_server, as `voicepipe up` runs it) as a real process for
a test: started on a free port, waited for until it lists its models, stopped with SIGTERM."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from voicepipe import embedded


@contextlib.contextmanager
def llm_server(log_path: Path, *extra: str, threads: int = 2, start_timeout_s: float = 60) -> Iterator[str]:
    """Yields the server's root URL (its API is under /v1); `extra`: more command-line options."""
    port = embedded.free_port()
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [*embedded.llm_argv(port, threads=threads), *extra], stdout=log_file, stderr=subprocess.STDOUT
        )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{root}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the embedded LLM server did not start"
            time.sleep(0.2)
        yield root
    finally:
        server.terminate()
        # uvicorn stops gracefully on SIGTERM, then raises the signal again: killed by it, cleanly
        assert server.wait(15) in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
