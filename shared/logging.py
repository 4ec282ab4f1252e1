"""One logging setup for every process, and what must never reach a log line.

A correlation id and conversation id live in context variables; a filter copies them into every
record, so `grep <id>` over all processes' logs shows a conversation's whole life.

No secret reaches a log line: `RedactSecrets` rewrites every record before it is formatted,
including third-party ones (uvicorn logs each WebSocket handshake with its full path, so
`/v1/ws?token=…&resume_token=…` would otherwise be written out, and websockets logs every request
header at DEBUG). It blanks the values of secret-bearing query parameters, bearer credentials,
`token.<T>` subprotocols, URL passwords, and every configured secret wherever it appears (also
percent-encoded), in the message and in tracebacks. A URL that is printed on purpose goes through
`redact_url` (passwords in the userinfo and in `password`/`token` query parameters).

What users say and hear (transcripts, typed text, replies) is personal data: `log_content` writes
it at INFO only when `LOG_CONTENT` is true, and otherwise at DEBUG only, with an INFO line that says
how long it was."""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit

correlation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")
conversation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("conversation_id", default="-")
_process_name = "voicepipe"


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id_var.get()
        record.conversation_id = conversation_id_var.get()
        record.process_name = _process_name
        return True


REDACTED = "***"
MIN_SECRET_CHARS = 4  # shorter configured secrets are not replaced everywhere (it would garble logs)
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;\s])(?:token|resume_token|access_token|api_key|apikey|key|password)=)[^&;\s\"'#]*")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+")
_URL_PASSWORD = re.compile(r"(\w://[^:/@\s]*:)[^@/\s]+(@)")
_SUBPROTOCOL_HEADER = re.compile(r"(?i)sec-websocket-protocol:[^\r\n]*")  # websockets logs request headers at DEBUG
_SUBPROTOCOL_TOKEN = re.compile(r"(?i)(token\.)[^\s,]+")
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class RedactSecrets(logging.Filter):
    """Blanks secrets out of a record's message and traceback (see the module docstring)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        literal = {form for secret in secrets if len(secret) >= MIN_SECRET_CHARS for form in (secret, quote(secret, safe=""))}
        self._literal = sorted(literal, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._literal:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _SUBPROTOCOL_HEADER.sub(lambda m: _SUBPROTOCOL_TOKEN.sub(lambda t: t.group(1) + REDACTED, m.group(0)), text)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(2), text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it as logging does
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
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
            entry["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(process_name)s %(name)s "
    "[cid=%(correlation_id)s conv=%(conversation_id)s] %(message)s"
)


def setup_logging(
    level: str = "INFO", fmt: str = "text", process_name: str = "voicepipe", secrets: Iterable[str] = ()
) -> None:
    """`secrets`: configured secrets to blank out wherever they appear (Settings.secret_values())."""
    global _process_name
    _process_name = process_name
    redact = RedactSecrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(redact)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:  # also before any handler uvicorn's own log config might add
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, RedactSecrets)] + [redact]
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


MASK = "***"
SECRET_QUERY_KEYS = frozenset({"password", "token", "api_key", "access_token"})


def redact_url(url: str) -> str:
    """`url` with its password masked, in the userinfo (`redis://:pw@`, `redis://user:pw@`,
    `rediss://…`) and in secret query parameters (`?password=`); the rest is kept for operators.

    Never raises: a URL too broken to parse is shown as its scheme only."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{hostport}" if has_password else netloc
        query = parts.query
        if query:
            pairs = [pair.partition("=") for pair in query.split("&")]  # raw, so the rest is shown as given
            query = "&".join(
                f"{k}={MASK}" if unquote_plus(k).lower() in SECRET_QUERY_KEYS else f"{k}{eq}{v}" for k, eq, v in pairs
            )
        if "//" not in url:
            return urlunsplit(parts._replace(netloc=netloc, query=query))
        # urlunsplit drops an empty authority (unix:///path -> unix:/path); keep the URL's own shape
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + (
            f"#{parts.fragment}" if parts.fragment else ""
        )
    except ValueError:
        return f"{url.partition(':')[0]}://{MASK}"


def log_content(
    logger: logging.Logger, enabled: bool, msg: str, *args: object, content: str, level: int = logging.INFO
) -> None:
    """Log `msg % args` followed by the user's or the assistant's words `content`.

    Content logging on (`LOG_CONTENT`): one line at `level`, ending in the quoted content. Off: the
    same line at DEBUG when DEBUG is enabled; otherwise a line at `level` with the content's length only."""
    if enabled:
        logger.log(level, f"{msg}: %r", *args, content)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug(f"{msg}: %r", *args, content)
    else:
        logger.log(level, f"{msg} ({len(content)} characters)", *args)
