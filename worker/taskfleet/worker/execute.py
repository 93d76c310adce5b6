"""Run one task attempt in the current thread, turning every outcome into a result.

Both pools call ``run_job``: the process pool inside its children, the thread
pool in its threads. It never raises, so a task can break neither the loop of a
pool process nor a pool thread.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from taskfleet.common import codec
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import LeaseRef, TaskError
from taskfleet.worker.context import TaskContext, task_context
from taskfleet.worker.registry import REGISTRY

_MAX_NAMES_LISTED = 20


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt as the pool needs it: small, so it pickles cheaply into a child."""

    ref: LeaseRef
    name: str
    queue: str
    attempt: int  # 1-based
    payload: bytes
    content_type: str
    timeout_s: float  # 0: no limit; already resolved from the spec or the @task default
    deadline: float | None  # unix time the hard limit strikes; None without one
    metadata: dict[str, str]
    max_attempts: int = 1  # for the caller's retry decision; the pool ignores it


@dataclass(frozen=True, slots=True)
class JobResult:
    """How one attempt ended; ``result`` is the JSON return value when ``ok``."""

    ref: LeaseRef
    ok: bool
    result: bytes = b""
    error: TaskError | None = None
    cancelled: bool = False


def failed(ref: LeaseRef, error_type: str, message: str, *, cancelled: bool = False) -> JobResult:
    """A failed result the pool reports itself (the task could not report it)."""
    return JobResult(ref, ok=False, error=TaskError(error_type, message), cancelled=cancelled)


def run_job(job: Job) -> JobResult:
    """Run ``job`` here and now; every failure becomes an error result."""
    definition = REGISTRY.get(job.name)
    if definition is None:
        return failed(job.ref, "UnknownTask", f"unknown task {job.name!r}; {_registered()}")
    try:
        args, kwargs = codec.decode_args(job.payload, job.content_type)
    except InvalidArgument as exc:
        return failed(job.ref, "InvalidPayload", str(exc))
    context = TaskContext(
        task_id=job.ref.task_id,
        name=job.name,
        queue=job.queue,
        attempt=job.attempt,
        deadline=job.deadline,
        metadata=job.metadata,
    )
    try:
        with task_context(context):
            value = definition.func(*args, **kwargs)
    # BaseException too: a task calling sys.exit() must fail, not end the pool.
    except BaseException as exc:
        return _raised(job.ref, exc)
    return _encoded(job.ref, value)


def _encoded(ref: LeaseRef, value: Any) -> JobResult:
    try:
        return JobResult(ref, ok=True, result=codec.encode_result(value))
    except (TypeError, ValueError) as exc:
        return failed(ref, "ResultNotSerializable", f"the return value is not JSON: {exc}")


def _raised(ref: LeaseRef, exc: BaseException) -> JobResult:
    # Skip run_job's own frame: the traceback should start in the user's code.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return JobResult(ref, ok=False, error=TaskError(type(exc).__qualname__, str(exc), text))


def _registered() -> str:
    names = sorted(REGISTRY)
    if not names:
        return "no tasks are registered (check --tasks)"
    listed = ", ".join(names[:_MAX_NAMES_LISTED])
    more = len(names) - _MAX_NAMES_LISTED
    return f"registered: {listed}" + (f" and {more} more" if more > 0 else "")
