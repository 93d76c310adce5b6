"""``current_task()``: the running task's context, like a ``threading.local``
request context.

The pool sets it around each call in the thread that runs the task, so it is
right for every task even with many tasks at once in one thread pool.

``set_progress`` hands the update to this process's progress sink: in a worker
process the sender, which coalesces and sends it over the stream; in a process
pool's child the channel to its parent, which hands it to its own sink.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import field

from taskfleet.common.codec import utf8_text
from taskfleet.common.frozen import frozen
from taskfleet.common.model import LeaseRef

MAX_PROGRESS_MESSAGE_CHARS = 1000  # longer messages are cut to this

# Takes (lease, fraction, message); called on the task's own thread, so it must be cheap.
ProgressSink = Callable[[LeaseRef, float, str], None]


@frozen
class TaskContext:
    """What a running task knows about itself."""

    task_id: str
    name: str
    queue: str
    attempt: int  # 1-based
    deadline: float | None  # unix time the hard time limit strikes, None without one
    metadata: Mapping[str, str] = field(default_factory=dict)
    lease: int = field(default=0, repr=False)  # fences the task's progress updates

    def set_progress(self, fraction: float, message: str = "") -> None:
        """Say how far the task is, 0 to 1, for GetTask, the CLI and the dashboard.

        Cheap enough to call in a loop: updates are coalesced to a few per second
        per task, the last one always sent. Raises ValueError for a fraction
        outside 0..1 (or not a number), TypeError for a message that is not a str.
        """
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or math.isnan(fraction)
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(f"progress fraction must be a number from 0 to 1, not {fraction!r}")
        if not isinstance(message, str):
            raise TypeError(f"progress message must be a str, not {type(message).__name__}")
        sink = _sink
        if sink is not None:
            sink(
                LeaseRef(self.task_id, self.lease),
                float(fraction),
                utf8_text(message[:MAX_PROGRESS_MESSAGE_CHARS]),
            )


_local = threading.local()
_sink: ProgressSink | None = None


def current_task() -> TaskContext:
    """The task running in this thread; raises RuntimeError outside a task."""
    context: TaskContext | None = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("current_task() called outside a running task")
    return context


def set_progress_sink(sink: ProgressSink | None) -> None:
    """Where this process's ``set_progress`` calls go (None: nowhere)."""
    global _sink
    _sink = sink


def report_progress(ref: LeaseRef, fraction: float, message: str) -> None:
    """Hand an update that came from a pool process to this process's sink."""
    sink = _sink
    if sink is not None:
        sink(ref, fraction, message)


class RunningTask:
    """``with RunningTask(context):`` makes ``context`` this thread's current task
    for the block. A class, not a generator-based context manager: it is entered
    once per task, and costs 0.9 µs against 2.1 µs."""

    __slots__ = ("_context", "_previous")

    def __init__(self, context: TaskContext) -> None:
        self._context = context
        self._previous: TaskContext | None = None

    def __enter__(self) -> TaskContext:
        self._previous = getattr(_local, "context", None)
        _local.context = self._context
        return self._context

    def __exit__(self, *exc_info: object) -> None:
        _local.context = self._previous
