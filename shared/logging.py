"""One logging setup for every process.

A correlation id and conversation id live in context variables; a filter copies them into every
record, so `grep <id>` over all processes' logs shows a conversation's whole life."""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

correlation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")
conversation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("conversation_id", default="-")
_process_name = "voicepipe"


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id_var.get()
        record.conversation_id = conversation_id_var.get()
        record.process_name = _process_name
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": record.process_name,
            "logger": record.name,
            "correlation_id": record.correlation_id,
            "conversation_id": record.conversation_id,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(process_name)s %(name)s "
    "[cid=%(correlation_id)s conv=%(conversation_id)s] %(message)s"
)


def setup_logging(level: str = "INFO", fmt: str = "text", process_name: str = "voicepipe") -> None:
    global _process_name
    _process_name = process_name
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


@contextlib.contextmanager
def log_context(conversation_id: str | None = None, correlation_id: str | None = None) -> Iterator[None]:
    """Tag every log record (and every task created) inside the block with these ids."""
    tokens = []
    if conversation_id:
        tokens.append((conversation_id_var, conversation_id_var.set(conversation_id)))
    if correlation_id:
        tokens.append((correlation_id_var, correlation_id_var.set(correlation_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
