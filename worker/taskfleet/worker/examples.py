"""Example tasks bundled with taskfleet (``make run-worker`` serves these)."""

from __future__ import annotations

import time
from typing import Any

from taskfleet.worker import current_task, task


@task
def square(n: float) -> float:
    """The square of ``n``."""
    return n * n


@task
def add(a: float, b: float) -> float:
    """The sum of ``a`` and ``b``."""
    return a + b


@task
def sleep(seconds: float) -> float:
    """Sleep, then return how long; an IO-bound stand-in."""
    time.sleep(seconds)
    return seconds


@task
def fail(message: str = "failed on purpose") -> None:
    """Always raise, to see retries and FAILED tasks."""
    raise RuntimeError(message)


@task
def whoami() -> dict[str, Any]:
    """The running task's own context, as current_task() reports it."""
    ctx = current_task()
    return {
        "task_id": ctx.task_id,
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "metadata": dict(ctx.metadata),
    }


@task
def noop() -> None:
    """Do nothing; measures per-task overhead."""
