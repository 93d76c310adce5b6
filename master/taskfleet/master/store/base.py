"""The queue store interface: the one seam between the master and its storage.

A store holds every task and is the single authority on its state. It is
BaseManager's "named queues you put to and get from", extended with leases:
``lease`` is a get that must be confirmed by ``record`` before the lease
deadline, renewed by ``extend``, or it lapses and ``expire`` puts the task back.

Every method is safe to call from many threads at once. Times are unix seconds
passed in by the caller, so tests and the master share one clock.

Fencing: each lease of a task gets a greater lease number than any before it
(``Task.lease``; the next one, but on PostgreSQL after a crash of its server). A
``LeaseRef`` whose number is not the task's current one, or whose task is no
longer RUNNING, is stale: ``extend`` reports it, ``record`` and ``release``
ignore it. So a worker presumed dead that comes back can never overwrite
anything, and a task's final state is written exactly once.

Lifecycle limits (``StorePolicy``): a lease that lapses puts its task back, but
only ``max_lost_leases`` times; the next lapse ends it FAILED ``WorkerLost``, so a
task that kills every worker it runs on cannot circulate forever. A task that
ended is kept for its result TTL and then deleted by ``prune`` (with its
idempotency key), so a store under a steady load stops growing.
"""

from __future__ import annotations

import abc
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

from taskfleet.common.backoff import backoff_s
from taskfleet.common.errors import InvalidArgument, NotFound
from taskfleet.common.frozen import frozen
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    MasterInfo,
    Outcome,
    PendingName,
    Progress,
    QueueCounts,
    Schedule,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    WorkerInfo,
)

WORKER_LOST = "WorkerLost"
FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
MAX_PAGE_SIZE = 1_000


@frozen
class KeyLoad:
    """The RUNNING tasks of one concurrency key (master/concurrency.py)."""

    running: int
    limit: int  # the smallest concurrency_limit among them


@frozen
class StorePolicy:
    """The lifecycle limits a store enforces itself, since it alone sees every lapse
    and every end."""

    # Seconds a finished task is kept when its spec names no TTL; 0 keeps it forever.
    result_ttl_s: float = 86_400.0
    # Lapsed leases a task survives; the next one ends it FAILED WorkerLost.
    max_lost_leases: int = 3
    # Delay before a failed task runs again, by the number of attempts it used.
    retry_backoff_s: Callable[[int], float] = backoff_s


DEFAULT_POLICY = StorePolicy()


def retry_delay_s(policy: StorePolicy, outcome: Outcome, used: int) -> float | None:
    """How long until the task of a FAILED ``outcome`` runs again, having used
    ``used`` attempts; None when it ends now."""
    if outcome.no_retry or used >= outcome.max_attempts:
        return None
    return outcome.retry_delay_s or policy.retry_backoff_s(used)


@frozen
class TaskQuery:
    """Which tasks ``list_tasks`` returns; an empty field matches everything."""

    queue: str = ""
    name: str = ""
    states: frozenset[TaskState] = frozenset()


@frozen
class FiredTick:
    """A schedule's tick that ``fire_schedule`` submits as ``spec``."""

    tick: float
    spec: TaskSpec


@frozen
class TaskPage:
    """One page of ``list_tasks``, newest first; ``next_cursor`` is None on the last."""

    tasks: list[Task]
    next_cursor: int | None


def worker_lost_error(lost_by: Sequence[str]) -> TaskError:
    """The error of a task whose lease lapsed once more than the policy allows."""
    workers = ", ".join(dict.fromkeys(lost_by)) or "unknown"
    return TaskError(
        WORKER_LOST,
        f"the task's worker was lost {len(lost_by)} times (workers: {workers}); "
        "the task may crash or exhaust the worker that runs it",
    )


def not_found(task_id: str) -> NotFound:
    """The error for an unknown id, which may be one that expired."""
    return NotFound(
        f"task {task_id} not found (finished tasks are deleted when their result TTL runs out)"
    )


def check_outcomes(outcomes: Sequence[Outcome]) -> None:
    """Refuse the whole batch up front if an outcome does not end its attempt, so a
    bad outcome never leaves half of the batch applied."""
    for outcome in outcomes:
        if outcome.state not in FINAL_STATES:
            raise InvalidArgument(
                f"outcome state of task {outcome.ref.task_id} must be SUCCEEDED, FAILED "
                f"or CANCELLED, not {outcome.state.name}"
            )


def first_outcomes(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Each lease's first outcome, in order: the first ends the lease, so a repeat
    is stale, as if applied after it."""
    firsts: dict[tuple[str, int], Outcome] = {}
    for outcome in outcomes:
        firsts.setdefault((outcome.ref.task_id, outcome.ref.lease), outcome)
    return list(firsts.values())


def attempts_used(attempts: int, attempt_base: int, lost_leases: int) -> int:
    """Attempts that count against ``max_attempts``: starts since the last RetryTask
    (``attempt_base`` is the count then), less those whose lease lapsed."""
    return attempts - attempt_base - lost_leases


def expires_at(spec: TaskSpec, finished_at: float, policy: StorePolicy) -> float:
    """When a task that finished at ``finished_at`` is deleted; 0 for never."""
    ttl_s = spec.result_ttl_s or policy.result_ttl_s
    return finished_at + ttl_s if ttl_s > 0 else 0.0


def schedule_not_found(schedule_id: str) -> NotFound:
    return NotFound(f"schedule {schedule_id} not found")


def new_task_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits.

    Time first, as in UUIDv7, so ids sort by creation and an index on them
    grows at its end: with random ids, every insert into a deep SQLite queue
    dirtied a page of its own somewhere in the id index, and submit slowed
    four times over at a million tasks."""
    global _random_parts
    part = next(_random_parts, None)
    if part is None:
        _random_parts = _draw_random_parts()
        part = next(_random_parts)
    return f"{time.time_ns() // 1_000_000:012x}{part}"


# The random parts of new ids, drawn from the OS a few thousand at a time: a
# system call per id took half of the 2.2 us an id cost. ``next`` on a list's
# iterator is atomic under the GIL, so no two threads ever take the same part
# (two that find it empty at once each draw afresh); a forked child draws its
# own, never the rest of its parent's.
_RANDOM_PARTS = 4096
_random_parts: Iterator[str] = iter(())


def _draw_random_parts() -> Iterator[str]:
    digits = os.urandom(10 * _RANDOM_PARTS).hex()
    return iter([digits[i : i + 20] for i in range(0, len(digits), 20)])


def _forget_random_parts() -> None:
    global _random_parts
    _random_parts = iter(())


os.register_at_fork(after_in_child=_forget_random_parts)


class Store(abc.ABC):
    """Durable or volatile home of all tasks; see the module docstring."""

    # Called once (from the failing call's thread) when the store finds it can no
    # longer be used, e.g. a damaged file: the master then reports NOT_SERVING.
    on_unusable: Callable[[], None] | None = None
    # Called once (from the failing call's thread) when the server of a networked
    # store is lost: calls then fail with StoreUnavailable until ``ping`` succeeds.
    on_unavailable: Callable[[], None] | None = None
    # The one lock every call takes, when there is one (memory, sqlite). The master
    # makes a call on its event loop while this lock is free and hands it to a
    # thread while another thread holds it, so the loop does not wait on the lock.
    # A store that waits on a network (postgres) has none, and the master makes
    # all its calls on threads.
    lock: threading.Lock | None = None

    @abc.abstractmethod
    def submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        """Enqueue ``specs`` atomically as PENDING; return their ids in order.

        A spec with ``depends_on`` (ids, or ``$N`` for spec N of this batch) waits,
        PENDING but never leased, until every parent SUCCEEDED (see store/deps.py).
        An unknown parent raises InvalidArgument, one already FAILED or CANCELLED
        FailedPrecondition, each naming ``tasks[i].depends_on[j]``.

        A spec whose ``idempotency_key`` is already known (from an earlier
        call or earlier in the same batch) is not enqueued again: the earlier
        task's id is returned in its place. A spec with ``not_before`` in the
        future is PENDING but not leased before that time.
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> Task:
        """The task; raises ``NotFound`` naming ``task_id``."""

    @abc.abstractmethod
    def get_many(self, task_ids: Sequence[str]) -> list[Task]:
        """The tasks in the order asked; raises ``NotFound`` naming the first unknown id."""

    @abc.abstractmethod
    def get_final(self, task_ids: Sequence[str]) -> list[Task]:
        """Those of ``task_ids`` that are final, in the order asked, as ``get_many``
        would return them; raises ``NotFound`` naming the first unknown id.

        What a wait sends at once. Its tasks are mostly still PENDING or RUNNING,
        and reading their whole rows only to drop them took about 14% of an SQLite
        master's time in the W1 benchmark: of the others, only the id is read."""

    @abc.abstractmethod
    def lease(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str] | None,
        limit: int,
        lease_s: float,
        now: float,
        *,
        exclude_keys: Collection[str] = (),
    ) -> list[Lease]:
        """Hand out up to ``limit`` ready tasks of ``queues`` whose name is in ``names``
        (any name when ``names`` is None), passing over tasks whose concurrency key
        is in ``exclude_keys`` (they stay ready).

        Ready means PENDING with ``not_before`` and any retry backoff passed.
        Order: higher priority first, then submission order (across all the
        given queues). Each leased task becomes RUNNING with ``attempts`` and
        ``lease`` incremented, ``worker_id`` and ``started_at`` set, until
        ``now + lease_s``. The cost must not grow with the number of queued
        tasks beyond O(log n).
        """

    @abc.abstractmethod
    def running_by_key(self) -> dict[str, KeyLoad]:
        """For each concurrency key with RUNNING tasks, how many run and the smallest
        limit among them. Indexed: the cost grows with RUNNING keyed tasks only."""

    @abc.abstractmethod
    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        """Renew the valid leases among ``refs`` to ``now + lease_s``; return the stale
        ones (task not RUNNING, another lease number, or leased to another worker),
        which the worker must stop."""

    @abc.abstractmethod
    def set_progress(self, updates: Sequence[Progress]) -> list[Progress]:
        """Store the progress of the valid leases among ``updates``; ignore stale
        ones. A task keeps the last value it set after it finishes. Returns the
        updates stored (what WaitTasks callers that asked for progress hear)."""

    @abc.abstractmethod
    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        """Apply the outcomes of valid leases in one transaction; ignore stale ones.

        SUCCEEDED stores the result; CANCELLED ends the task; FAILED stores the
        error and, while the task has used fewer than the outcome's
        ``max_attempts`` (see ``attempts_used``), makes it PENDING again, ready
        after ``policy.retry_backoff_s``; else it ends FAILED. Returns the tasks
        the outcomes changed, as they are now, then their dependents that became
        ready or ended (CANCELLED ParentFailed, FAILED ArgumentsTooLarge; see
        store/deps.py).
        """

    @abc.abstractmethod
    def retry(self, task_id: str, now: float) -> Task:
        """Make a FAILED or CANCELLED task PENDING again, ready at once, with a fresh
        attempt budget and lost-lease count (``attempts`` keeps counting starts).

        Raises ``NotFound``, or ``FailedPrecondition`` naming any other state.
        """

    @abc.abstractmethod
    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        """Give back valid leases of tasks that never started: PENDING and ready at once,
        the attempt not counted. Returns how many were released."""

    @abc.abstractmethod
    def cancel(self, task_id: str, now: float) -> list[Task]:
        """End a PENDING or RUNNING task as CANCELLED; return it, then the dependents
        that ended CANCELLED ParentFailed with it.

        Raises ``NotFound`` for an unknown id and ``FailedPrecondition`` for a
        task already final. A RUNNING task's worker learns of it from
        ``extend``; its late outcome is then stale.
        """

    @abc.abstractmethod
    def expire(self, now: float) -> list[Task]:
        """Return every RUNNING task whose lease deadline has passed to PENDING, ready
        at once (the lapsed attempt stays counted), and count the lost lease.

        A task that has already lost ``policy.max_lost_leases`` leases ends FAILED
        with ``worker_lost_error`` instead. Returns the lapsed tasks as they are
        now, in the order their leases lapsed, then the dependents of those that
        ended (CANCELLED ParentFailed).
        """

    @abc.abstractmethod
    def prune(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` finished tasks whose TTL has run out, with their
        idempotency keys; returns how many. Bounded, so a caller deletes a large
        backlog in short steps that never hold up submit or lease."""

    @abc.abstractmethod
    def purge(self, query: TaskQuery, limit: int) -> int:
        """Delete up to ``limit`` finished tasks that ``query`` matches (its states
        must all be final; empty means every final state); returns how many."""

    @abc.abstractmethod
    def list_tasks(self, query: TaskQuery, limit: int, cursor: int | None = None) -> TaskPage:
        """Up to ``limit`` tasks that ``query`` matches, newest first, from just past
        ``cursor`` (a page's ``next_cursor``). Keyset paging: a task submitted while
        a caller pages is never seen twice and never makes another one skipped."""

    @abc.abstractmethod
    def next_ready_at(self, now: float) -> float | None:
        """Earliest time after ``now`` at which a delayed PENDING task becomes ready,
        or None; lets the dispatcher sleep exactly as long as it can."""

    @abc.abstractmethod
    def stats(self) -> list[QueueCounts]:
        """Task counts per queue and state, sorted by queue name; every state present.
        A queue is listed while it holds a task."""

    @abc.abstractmethod
    def oldest_pending(self, now: float) -> dict[str, float]:
        """For each queue with a ready PENDING task, when the one that has waited
        longest became ready: was submitted, came due (``not_before``, a retry's
        backoff), saw its last parent succeed, or was put back (released, lease
        lapsed, RetryTask). Tasks still delayed or waiting for parents do not count;
        tasks passed over (concurrency keys, rate limits) do. Indexed: the cost is
        O(log n) per queue, however many tasks wait."""

    @abc.abstractmethod
    def pending_names(self, limit: int) -> list[PendingName]:
        """PENDING tasks counted per queue and name, the largest counts first (then
        by queue and name), at most ``limit``. A scan of the pending tasks."""

    # -- schedules (master/schedules.py says when their ticks fall) ---------------

    @abc.abstractmethod
    def add_schedule(self, schedule: Schedule) -> Schedule:
        """Store ``schedule`` under a new id (``new_task_id``); return it."""

    @abc.abstractmethod
    def get_schedule(self, schedule_id: str) -> Schedule:
        """The schedule; raises ``NotFound`` naming ``schedule_id``."""

    @abc.abstractmethod
    def list_schedules(self) -> list[Schedule]:
        """Every schedule, oldest first."""

    @abc.abstractmethod
    def delete_schedule(self, schedule_id: str) -> None:
        """Delete the schedule (it fires nothing from then on); raises ``NotFound``."""

    @abc.abstractmethod
    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        """Set the schedule's ``paused`` and ``next_fire``; return it. Raises ``NotFound``."""

    @abc.abstractmethod
    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        """Up to ``limit`` unpaused schedules whose ``next_fire`` is at or before ``now``,
        the earliest first."""

    @abc.abstractmethod
    def next_schedule_fire(self) -> float | None:
        """The earliest ``next_fire`` of the unpaused schedules, or None."""

    @abc.abstractmethod
    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        """Fire the schedule's tick ``due`` (its ``next_fire`` as the caller read it), in
        one transaction: move its ``next_fire`` on to ``next_fire`` and, with ``fired``,
        set ``last_fire`` to its tick and submit its spec as a PENDING task.

        Only if the schedule still exists, is not paused and still has ``next_fire ==
        due``; otherwise (another master fired it first, or it was paused or deleted)
        change nothing. So however many masters race, each tick fires at most once.
        Returns the new task's id, or None when nothing was submitted."""

    def ping(self) -> None:  # noqa: B027 - a store in the master's process is always there
        """Raise ``StoreUnavailable`` unless the store answers; cheap enough to call
        every second. After an outage, the first ping that succeeds makes the store
        usable again."""

    def bus(self) -> Bus | None:
        """How masters sharing this store reach each other, or None for a store
        that only one master can use (memory, SQLite)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources; the store is unusable afterwards."""


class Bus(Protocol):
    """What masters sharing one store tell each other; see master/cluster.py.

    Calls block on the database and are safe from any thread."""

    def beat(
        self, me: MasterInfo, workers: Sequence[WorkerInfo], forget_after_s: float
    ) -> tuple[list[MasterInfo], list[WorkerInfo]]:
        """Record that ``me`` is alive with ``workers`` connected, forget masters
        silent for ``forget_after_s``; every live master, and the workers of the
        others."""

    def leave(self, master_id: str) -> None:
        """Forget this master and its workers (it is stopping)."""

    def notify(self, messages: Sequence[str]) -> None:
        """Send ``messages`` to every listening master, this one included."""

    def listen(self, deliver: Callable[[str | None], None], stop: threading.Event) -> None:
        """Hand each message any master sends to ``deliver`` until ``stop`` is set;
        None when the connection was lost and regained (messages may be missed)."""

    def finished(self, task_ids: Sequence[str]) -> list[Task]:
        """Those of ``task_ids`` that are final (unknown ids are left out)."""

    def take_tokens(self, key: str, want: int, rate_per_s: float, burst: float) -> int:
        """Take up to ``want`` tokens of the shared bucket ``key``, atomically; see
        ratelimit.Buckets."""
