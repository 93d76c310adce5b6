"""The task model shared by master, worker and clients.

Plain dataclasses: protobuf appears only at the edges (see ``convert``), so the
master's stores and the worker's pool never touch generated code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from taskfleet.common.frozen import frozen

JSON = "application/json"
DEFAULT_QUEUE = "default"

# The ranges of the protobuf types the model crosses (int32, Duration,
# Timestamp): a value outside them cannot be sent, so clients refuse it first.
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
MAX_DURATION_S = 315_576_000_000  # 10,000 years
MAX_UNIX_S = 253_402_300_799  # 9999-12-31T23:59:59Z


class TaskState(enum.IntEnum):
    """Lifecycle of a task; values match ``taskfleet.v1.TaskState``."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_final(self) -> bool:
        return self >= TaskState.SUCCEEDED


@frozen
class TaskSpec:
    """What a producer asks to run (validated and with defaults filled in)."""

    name: str
    queue: str = DEFAULT_QUEUE
    payload: bytes = b'{"args": [], "kwargs": {}}'
    content_type: str = JSON
    priority: int = 0
    # 0 leaves the choice to the worker's @task default (1 when it has none).
    max_attempts: int = 0
    timeout_s: float = 0.0  # 0: no limit
    not_before: float = 0.0  # unix time; 0: at once
    idempotency_key: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    result_ttl_s: float = 0.0  # kept this long after it ends; 0: the master's default
    # Unix time it must start by, else it ends CANCELLED Expired; 0: no limit. Not
    # Task.expires_at, which is when a finished task is deleted.
    expires_at: float = 0.0
    # Parents that must succeed first: task ids, or "$N" for the Nth (0-based) spec
    # of the same Submit; the store keeps them resolved to ids.
    depends_on: tuple[str, ...] = ()
    # The parents' results are prepended to the positional arguments, in order.
    pass_results: bool = False
    # ... or passed as one list, the first positional argument (a chord's callback).
    gather_results: bool = False
    # At most concurrency_limit RUNNING tasks share a non-empty concurrency_key.
    concurrency_key: str = ""
    concurrency_limit: int = 0


@frozen
class TaskError:
    """Why an attempt failed."""

    type: str
    message: str
    traceback: str = ""


@dataclass(slots=True)
class Task:
    """A task as the master stores it."""

    id: str
    spec: TaskSpec
    state: TaskState = TaskState.PENDING
    attempts: int = 0
    lease: int = 0  # lease number, grows with every lease: the fencing token
    result: bytes = b""
    result_content_type: str = ""
    error: TaskError | None = None
    worker_id: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    lost_leases: int = 0  # leases that lapsed (worker died, hung or was cut off)
    expires_at: float = 0.0  # when a finished task is deleted; 0: not finished, or never
    progress: float = 0.0  # 0..1, as the task last set it (kept once it is final)
    progress_message: str = ""


@frozen
class LeaseRef:
    """One lease of one task: the pair every heartbeat and result is fenced by."""

    task_id: str
    lease: int


@frozen
class Progress:
    """How far a running task is, as its function said last: fenced by its lease
    like a heartbeat, so a stale worker's word is ignored."""

    ref: LeaseRef
    fraction: float  # 0..1
    message: str = ""


@frozen
class TaskProgress:
    """A running task's progress as a wait that asked for it hears of it (see
    ``Client.wait``'s ``on_progress``)."""

    task_id: str
    fraction: float  # 0..1
    message: str


@frozen
class Lease:
    """A task handed to a worker until ``deadline`` unless renewed."""

    task: Task
    deadline: float

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.task.id, self.task.lease)


@frozen
class Outcome:
    """How one attempt ended, as a worker reports it.

    ``state`` is SUCCEEDED, FAILED or CANCELLED. What a FAILED attempt leads to
    is the master's decision: another attempt after a backoff while the task
    has attempts left of ``max_attempts`` (which the worker resolves from the
    spec or its ``@task`` default), else the end. ``no_retry`` (an exception its
    ``@task`` does not retry) ends it at once; ``retry_delay_s`` (a ``Retry``
    the task raised, or its ``@task`` backoff) replaces the master's backoff.
    """

    ref: LeaseRef
    state: TaskState
    result: bytes = b""
    result_content_type: str = JSON
    error: TaskError | None = None
    max_attempts: int = 1
    no_retry: bool = False
    retry_delay_s: float = 0.0


@frozen
class QueueCounts:
    """Number of tasks of one queue in each state, and since when its oldest ready
    PENDING task has waited (unix seconds; 0 when none is ready)."""

    queue: str
    counts: dict[TaskState, int]
    oldest_pending_at: float = 0.0


@frozen
class WorkerInfo:
    """A worker connected to the master, as GetStats reports it."""

    worker_id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    task_names: tuple[str, ...]
    concurrency: int
    running: int
    peer: str
    connected_at: float
    master_id: str = ""


@frozen
class MasterInfo:
    """A master serving the store: one alone, or several sharing a database."""

    master_id: str
    hostname: str
    pid: int
    listen: str
    started_at: float
    seen_at: float


@frozen
class PendingName:
    """How many PENDING tasks of ``queue`` are named ``name``."""

    queue: str
    name: str
    count: int


@frozen
class Stats:
    """Counts per queue, the connected workers and the masters; on request, the
    pending tasks per queue and name."""

    queues: list[QueueCounts]
    workers: list[WorkerInfo]
    masters: list[MasterInfo] = field(default_factory=list)
    pending_names: list[PendingName] = field(default_factory=list)

    def unserved(self) -> list[PendingName]:
        """Pending tasks no connected worker takes: none serves their queue, or
        none of those that do registers their name."""
        return [p for p in self.pending_names if not any(_takes(w, p) for w in self.workers)]


def _takes(worker: WorkerInfo, pending: PendingName) -> bool:
    return pending.queue in worker.queues and (
        not worker.task_names or pending.name in worker.task_names
    )


class MissedTicks(enum.IntEnum):
    """What a schedule does with ticks missed while no master ran; values match
    ``taskfleet.v1.MissedTicks``."""

    FIRE_ONCE = 1  # the latest missed tick fires once, late
    SKIP = 2  # a tick more than a few seconds late does not fire


# Metadata keys of a task a schedule fired: the schedule and the tick (RFC 3339, UTC).
SCHEDULE_ID_KEY = "taskfleet.schedule_id"
SCHEDULE_TICK_KEY = "taskfleet.schedule_tick"


@frozen
class Schedule:
    """A task submitted on each tick of a cron expression or an interval."""

    id: str
    spec: TaskSpec
    cron: str = ""  # five fields (a sixth is seconds), read in ``timezone``; or interval_s
    interval_s: float = 0.0
    timezone: str = "UTC"
    paused: bool = False
    missed: MissedTicks = MissedTicks.FIRE_ONCE
    next_fire: float = 0.0  # unix time of the next tick
    last_fire: float = 0.0  # unix time of the tick fired last; 0: none yet
    created_at: float = 0.0
