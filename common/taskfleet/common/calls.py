"""Calling a task by name: the spec that asks for ``name(*args, **kwargs)``, and
the value a finished task gives back (or the failure it raises)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.errors import InvalidArgument, TaskCancelled, TaskFailed
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
    concurrency_key: str = "",
    concurrency_limit: int | None = None,
) -> TaskSpec:
    """A TaskSpec for ``name(*args, **kwargs)`` with a JSON payload. Times are unix
    seconds or datetimes: ``not_before`` holds it back, ``expires_at`` is when it
    must have started by (else it ends CANCELLED Expired). At most
    ``concurrency_limit`` tasks of one ``concurrency_key`` run at once; a key
    alone means one at a time. Raises ``InvalidArgument`` naming the field for
    a limit below 1 or without a key, as the master would."""
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
        concurrency_key=concurrency_key,
        concurrency_limit=_concurrency_limit(concurrency_key, concurrency_limit),
    )


def _concurrency_limit(key: str, limit: int | None) -> int:
    """The limit to send with ``key``: checked here so a mistake is seen at the
    call that made it (a signature's ``set`` too), not at a later submit."""
    if not key:
        if limit:
            raise InvalidArgument("concurrency_key: must be set with concurrency_limit")
        return 0
    if limit is None:
        return 1
    if limit < 1:
        raise InvalidArgument(f"concurrency_limit: must be at least 1, got {limit}")
    return limit


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
