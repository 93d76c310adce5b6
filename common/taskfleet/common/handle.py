"""What ``submit`` gives back: the task's id, with the calls you make about it."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskfleet.common.codec import decode_result
from taskfleet.common.frozen import frozen
from taskfleet.common.model import Task, TaskError, TaskState
from taskfleet.common.waits import OnProgress

if TYPE_CHECKING:
    from taskfleet.common.client import Client

R = TypeVar("R")


@frozen
class TaskSnapshot:
    """A task as the master had it when asked, its result decoded and its times
    as aware datetimes (UTC); a time not reached yet is None."""

    id: str
    name: str
    queue: str
    state: TaskState
    attempts: int
    result: Any  # the decoded return value once SUCCEEDED, else None
    error: TaskError | None
    worker_id: str
    metadata: dict[str, str]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    progress: float  # 0..1, as the task last set it
    progress_message: str


def snapshot(task: Task) -> TaskSnapshot:
    succeeded = task.state is TaskState.SUCCEEDED
    return TaskSnapshot(
        id=task.id,
        name=task.spec.name,
        queue=task.spec.queue,
        state=task.state,
        attempts=task.attempts,
        result=decode_result(task.result, task.result_content_type) if succeeded else None,
        error=task.error,
        worker_id=task.worker_id,
        metadata=dict(task.spec.metadata),
        created_at=_when(task.created_at) or dt.datetime.fromtimestamp(0, dt.UTC),
        started_at=_when(task.started_at),
        finished_at=_when(task.finished_at),
        progress=task.progress,
        progress_message=task.progress_message,
    )


def _when(unix_s: float) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC) if unix_s else None


class TaskHandle(str, Generic[R]):
    """A submitted task. It is its id (a ``str``: code that kept ids keeps
    working), and it asks the client that submitted it for the rest."""

    _client: Client

    def __new__(cls, task_id: str, client: Client) -> TaskHandle[R]:
        handle = super().__new__(cls, task_id)
        handle._client = client
        return handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))  # the id travels; the client (a channel) cannot

    @property
    def id(self) -> str:
        return str(self)

    def get(self) -> TaskSnapshot:
        return snapshot(self._client.get(self.id))

    @property
    def state(self) -> TaskState:
        return self._client.get(self.id).state

    def result(self, timeout_s: float | None = None, *, on_progress: OnProgress | None = None) -> R:
        """The decoded result, waiting up to ``timeout_s`` (None: for ever), with
        ``on_progress`` called for each progress update meanwhile (``Client.wait``).

        Raises ``TaskFailed`` (with the remote ``type``, ``message`` and
        ``remote_traceback``), ``TaskCancelled``, or ``DeadlineExceeded``."""
        value: R = self._client.result(self.id, timeout_s, on_progress=on_progress)
        return value

    def cancel(self) -> TaskSnapshot:
        return snapshot(self._client.cancel(self.id))
