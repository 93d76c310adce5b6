"""What both clients' waits share: asking in chunks, taking the tasks that
finished off what is still awaited, and resuming after a lost stream.

A wait stream ends early when the master stops or restarts, or the connection
drops; the wait is then asked again (on the next master, with several) for the
tasks not yet reported, with backoff, rather than reported short. ``Resumption``
says how long to pause before asking again, and when the outage has lasted long
enough to give up with ``Unavailable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable

import grpc

from taskfleet.common import convert
from taskfleet.common.backoff import backoff_s
from taskfleet.common.errors import Unavailable
from taskfleet.common.model import Task, TaskProgress
from taskfleet.v1 import tasks_pb2

# What a wait calls with each progress update of a running task it waits for.
OnProgress = Callable[[TaskProgress], object]

# The master refuses a wait for more ids than this in one call (WaitTasks and
# WaitTasksBatched), so a wait asks in chunks of this size.
WAIT_CHUNK = 100_000
# How long a wait keeps resuming while a master it has reached before is
# unreachable (a restart), within the wait's own deadline, before it raises
# Unavailable. A master never reached gets RETRY_UNAVAILABLE_S, as other calls do.
RESUME_WAIT_S = 30.0
# How long a call is retried on UNAVAILABLE. By time, not by count: after a
# failed connect gRPC waits about 1 s (then 1.6 s, ...) before it dials again,
# and fails calls at once meanwhile, so a few quick retries would all fail
# before the channel even tried to reconnect.
RETRY_UNAVAILABLE_S = 5.0
# What a wait stream ends with when it should be asked again.
RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)


def wait_request(
    waiting: dict[str, None], deadline: float | None, on_progress: OnProgress | None = None
) -> tasks_pb2.WaitTasksBatchedRequest:
    """The request for the tasks still awaited, with what is left of the deadline
    (past it, a zero timeout still reports the tasks final by then), asking for
    progress when there is ``on_progress`` to hear it."""
    request = tasks_pb2.WaitTasksBatchedRequest(task_ids=list(waiting))
    if on_progress is not None:
        request.progress = True
    if deadline is not None:
        request.timeout.CopyFrom(convert.duration(max(deadline - time.monotonic(), 0)))
    return request


def report_progress(
    updates: Iterable[tasks_pb2.Task], waiting: Container[str], on_progress: OnProgress | None
) -> None:
    """Call ``on_progress`` with each update of a task still awaited."""
    if on_progress is None:
        return
    for pb in updates:
        if pb.id in waiting:
            on_progress(convert.task_progress_from_proto(pb))


def take_final(batch: tasks_pb2.TaskBatch, waiting: dict[str, None]) -> list[Task]:
    """The tasks of a wait's ``batch`` that are still in ``waiting``, taken off it:
    a wait asked again after a lost stream hears again of tasks it had."""
    final = []
    for pb in batch.tasks:
        task = convert.task_from_proto(pb)
        if task.id in waiting:
            del waiting[task.id]
            final.append(task)
    return final


class Resumption:
    """The outages of one wait, up to its ``deadline``."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline
        self._started: float | None = None
        self._attempt = 0

    def heard(self) -> None:
        """The master answered: an outage after this one starts afresh."""
        self._started, self._attempt = None, 0

    def pause_s(self, cause: str, awaited: int, *, reached: bool) -> float:
        """How long to pause before asking again, after the stream ended with
        ``cause``; raises ``Unavailable`` once the outage has lasted too long:
        RESUME_WAIT_S for a master this client has ``reached``, else
        RETRY_UNAVAILABLE_S, never past the deadline."""
        now = time.monotonic()
        self._started = self._started or now
        give_up = self._started + (RESUME_WAIT_S if reached else RETRY_UNAVAILABLE_S)
        if self._deadline is not None:
            give_up = min(give_up, self._deadline)
        if now >= give_up:
            if not reached:
                raise Unavailable(cause)
            raise Unavailable(
                f"lost the master while waiting for {awaited} task(s) and it did not "
                f"come back within {now - self._started:.1f} s: {cause}"
            )
        self._attempt += 1
        return min(backoff_s(self._attempt, base_s=0.1, cap_s=2.0), give_up - now)
