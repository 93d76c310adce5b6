"""Run one task attempt in the current thread, turning every outcome into a result.

Both pools call ``run_job``: the process pool inside its children, the thread
pool in its threads. It never raises, so a task can break neither the loop of a
pool process nor a pool thread: not by what it raises, nor by a return value or
an exception that the encoding here chokes on. A child the task forked never
leaves it: it ends in ``os._exit`` before any pool code runs in it.

An ``async def`` task runs to completion on an event loop of the thread that
runs it (one loop per pool thread or process, kept for the next async task),
so ``current_task()`` works inside it and a slot runs one task at a time, async
or not; a task that wants concurrency inside itself awaits ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import traceback
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from taskfleet.common import codec
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.frozen import frozen
from taskfleet.common.model import LeaseRef, TaskError
from taskfleet.worker.registry import REGISTRY, Retry
from taskfleet.worker.task_context import RunningTask, TaskContext

_MAX_NAMES_LISTED = 20
_loops = threading.local()
# Counts the forks that made this process, so run_job can tell that a task forked
# and left a child running on without asking the kernel for its pid (a system
# call, twice per job).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


@frozen
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


@frozen
class JobResult:
    """How one attempt ended; ``result`` is the JSON return value when ``ok``.
    A failure says whether it is worth another attempt, and after how long (0:
    as the master decides)."""

    ref: LeaseRef
    ok: bool
    result: bytes = b""
    error: TaskError | None = None
    cancelled: bool = False
    no_retry: bool = False
    retry_delay_s: float = 0.0


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
        lease=job.ref.lease,
    )
    forks = _forks
    try:
        with RunningTask(context):
            value = definition.func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = _await(value)
    # BaseException too: a task calling sys.exit() must fail, not end the pool.
    except BaseException as exc:
        _exit_if_forked(forks, 1)
        result = _raised(job.ref, exc)
        if isinstance(exc, Retry):
            return replace(result, retry_delay_s=exc.delay_s)
        if definition.retry_on is not None and not isinstance(exc, definition.retry_on):
            return replace(result, no_retry=True)
        return replace(result, retry_delay_s=definition.retry_delay_s(job.attempt))
    _exit_if_forked(forks, 0)
    return _encoded(job.ref, value)


def _await(awaitable: Awaitable[Any]) -> Any:
    """What an async task's awaitable gives, on this thread's own event loop."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()

    async def wait() -> Any:
        return await awaitable

    return loop.run_until_complete(wait())


def _exit_if_forked(forks: int, code: int) -> None:
    """End a child the task forked and left running the task's caller: run on, it
    would report the job a second time and take the pool's next jobs. No cleanup:
    its buffers and exit handlers are copies of the pool's."""
    if _forks != forks:
        os._exit(code)


def _encoded(ref: LeaseRef, value: Any) -> JobResult:
    try:
        return JobResult(ref, ok=True, result=codec.encode_result(value))
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"the return value is not JSON: {safe_str(exc)}"
    # Anything else the value's own methods raise while it is encoded.
    except BaseException as exc:
        message = f"encoding the return value raised {type(exc).__name__}: {safe_str(exc)}"
    return failed(ref, "ResultNotSerializable", message)


def _raised(ref: LeaseRef, exc: BaseException) -> JobResult:
    # Skip run_job's own frame: the traceback should start in the user's code.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # a chain deeper than the recursion limit, say
        text = ""
    return JobResult(ref, ok=False, error=TaskError(type(exc).__qualname__, safe_str(exc), text))


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder naming the failure when its ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException as error:
        return f"<{type(exc).__qualname__}.__str__ raised {type(error).__qualname__}>"


def _registered() -> str:
    names = sorted(REGISTRY)
    if not names:
        return "no tasks are registered (check --tasks)"
    listed = ", ".join(names[:_MAX_NAMES_LISTED])
    more = len(names) - _MAX_NAMES_LISTED
    return f"registered: {listed}" + (f" and {more} more" if more > 0 else "")
