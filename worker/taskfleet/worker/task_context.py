"""``current_task()``: the running task's context, like a ``threading.local``
request context.

The pool sets it around each call in the thread that runs the task, so it is
right for every task even with many tasks at once in one thread pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a running task knows about itself."""

    task_id: str
    name: str
    queue: str
    attempt: int  # 1-based
    deadline: float | None  # unix time the hard time limit strikes, None without one
    metadata: Mapping[str, str] = field(default_factory=dict)


_local = threading.local()


def current_task() -> TaskContext:
    """The task running in this thread; raises RuntimeError outside a task."""
    context: TaskContext | None = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("current_task() called outside a running task")
    return context


@contextmanager
def task_context(context: TaskContext) -> Iterator[TaskContext]:
    """Make ``context`` this thread's current task for the duration of the block."""
    previous = getattr(_local, "context", None)
    _local.context = context
    try:
        yield context
    finally:
        _local.context = previous
