"""Request context and the logging that carries it.

The master sets a context (request id, peer) around every RPC handler; the
worker sets one (task id, attempt) around every task it reports on. A logging
filter copies the current context into each record, so every log line says
which request or task it belongs to without passing loggers around.

The context is a ``contextvars`` variable: per thread, as ``threading.local``
would be, and also per asyncio task, so the master's RPCs, which share one
event loop thread, each log their own request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "taskfleet_context", default=None
)


def current_context() -> dict[str, str]:
    """The calling thread's or task's context (empty outside any request or task)."""
    return _context.get() or {}


@contextmanager
def bound_context(**fields: str) -> Iterator[dict[str, str]]:
    """Add ``fields`` to this thread's or task's context for the duration of the block."""
    previous = _context.get()
    context = {**(previous or {}), **fields}
    # Restored by value, not by token: an async generator may be closed from
    # another context than the one it set the variable in.
    _context.set(context)
    try:
        yield context
    finally:
        _context.set(previous)


LOG_TEXT_MAX_CHARS = 4096  # a log line stays readable; the task record keeps the whole text


def clipped(text: str, max_chars: int = LOG_TEXT_MAX_CHARS) -> str:
    """``text`` cut to ``max_chars`` for a log line, with a marker saying how much
    was cut: a task that raises with a multi-megabyte message must not flood the log."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... [{len(text) - max_chars} more characters cut from this line]"


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        record.context = context
        record.context_text = " ".join(f"{k}={v}" for k, v in context.items())
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "context", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process: text or JSON lines on stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(context_text)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
