"""Calling a task by name: the spec that asks for ``name(*args, **kwargs)``, and
the value a finished task gives back (or the failure it raises)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.errors import TaskCancelled, TaskFailed
from taskfleet.common.model import DEFAULT_QUEUE, JSON, Task, TaskSpec, TaskState


def make_spec(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    max_attempts: int = 0,
    timeout_s: float = 0.0,
    not_before: float | dt.datetime | None = None,
    idempotency_key: str = "",
    metadata: Mapping[str, str] | None = None,
    expires_at: float | dt.datetime | None = None,
) -> TaskSpec:
    """A TaskSpec for ``name(*args, **kwargs)`` with a JSON payload. Times are unix
    seconds or datetimes: ``not_before`` holds it back, ``expires_at`` is when it
    must have started by (else it ends CANCELLED Expired)."""
    if isinstance(not_before, dt.datetime):
        not_before = not_before.timestamp()
    if isinstance(expires_at, dt.datetime):
        expires_at = expires_at.timestamp()
    return TaskSpec(
        name=name,
        queue=queue,
        payload=encode_args(list(args), dict(kwargs or {})),
        content_type=JSON,
        priority=priority,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        not_before=not_before or 0.0,
        idempotency_key=idempotency_key,
        metadata=dict(metadata or {}),
        expires_at=expires_at or 0.0,
    )


def task_result(task: Task) -> Any:
    """The decoded result of a final task; raises ``TaskFailed`` unless it SUCCEEDED."""
    if task.state == TaskState.SUCCEEDED:
        return decode_result(task.result, task.result_content_type)
    error = task.error
    failure = TaskCancelled if task.state is TaskState.CANCELLED else TaskFailed
    raise failure(
        task.id,
        task.state.name,
        error.type if error else task.state.name,
        error.message if error else "",
        error.traceback if error else "",
    )
