"""The queue store interface: the one seam between the master and its storage.

A store holds every task and is the single authority on its state. It is
BaseManager's "named queues you put to and get from", extended with leases:
``lease`` is a get that must be confirmed by ``record`` before the lease
deadline, renewed by ``extend``, or it lapses and ``expire`` puts the task back.

Every method is safe to call from many threads at once. Times are unix seconds
passed in by the caller, so tests and the master share one clock.

Fencing: each lease of a task gets the next lease number (``Task.lease``). A
``LeaseRef`` whose number is not the task's current one, or whose task is no
longer RUNNING, is stale: ``extend`` reports it, ``record`` and ``release``
ignore it. So a worker presumed dead that comes back can never overwrite
anything, and a task's final state is written exactly once.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import ClassVar

from taskfleet.common.model import Lease, LeaseRef, Outcome, QueueCounts, Task, TaskSpec


def new_task_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits.

    Time first, as in UUIDv7, so ids sort by creation and an index on them
    grows at its end: with random ids, every insert into a deep SQLite queue
    dirtied a page of its own somewhere in the id index, and submit slowed
    four times over at a million tasks."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class Store(abc.ABC):
    """Durable or volatile home of all tasks; see the module docstring."""

    # Called once (from the failing call's thread) when the store finds it can no
    # longer be used, e.g. a damaged file: the master then reports NOT_SERVING.
    on_unusable: Callable[[], None] | None = None
    # Whether calls wait on a disk, a lock or a network, so that the master's event
    # loop must hand them to a thread; a store that only computes says False.
    blocks: ClassVar[bool] = True

    @abc.abstractmethod
    def submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        """Enqueue ``specs`` atomically as PENDING; return their ids in order.

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
    def lease(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str] | None,
        limit: int,
        lease_s: float,
        now: float,
    ) -> list[Lease]:
        """Hand out up to ``limit`` ready tasks of ``queues`` whose name is in ``names``
        (any name when ``names`` is None).

        Ready means PENDING with ``not_before`` and any retry backoff passed.
        Order: higher priority first, then submission order (across all the
        given queues). Each leased task becomes RUNNING with ``attempts`` and
        ``lease`` incremented, ``worker_id`` and ``started_at`` set, until
        ``now + lease_s``. The cost must not grow with the number of queued
        tasks beyond O(log n).
        """

    @abc.abstractmethod
    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        """Renew the valid leases among ``refs`` to ``now + lease_s``; return the stale
        ones (task not RUNNING, another lease number, or leased to another worker),
        which the worker must stop."""

    @abc.abstractmethod
    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        """Apply the outcomes of valid leases in one transaction; ignore stale ones.

        SUCCEEDED stores the result; CANCELLED ends the task; FAILED stores the
        error and, when ``retry_delay_s`` is set, makes the task PENDING again,
        ready after that delay, else ends it FAILED. Returns the tasks that
        reached a final state, as they are now.
        """

    @abc.abstractmethod
    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        """Give back valid leases of tasks that never started: PENDING and ready at once,
        the attempt not counted. Returns how many were released."""

    @abc.abstractmethod
    def cancel(self, task_id: str, now: float) -> Task:
        """End a PENDING or RUNNING task as CANCELLED and return it.

        Raises ``NotFound`` for an unknown id and ``FailedPrecondition`` for a
        task already final. A RUNNING task's worker learns of it from
        ``extend``; its late outcome is then stale.
        """

    @abc.abstractmethod
    def expire(self, now: float) -> list[Task]:
        """Return every RUNNING task whose lease deadline has passed to PENDING, ready
        at once (the lapsed attempt stays counted). Returns those tasks."""

    @abc.abstractmethod
    def next_ready_at(self, now: float) -> float | None:
        """Earliest time after ``now`` at which a delayed PENDING task becomes ready,
        or None; lets the dispatcher sleep exactly as long as it can."""

    @abc.abstractmethod
    def stats(self) -> list[QueueCounts]:
        """Task counts per queue and state, sorted by queue name; every state present."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources; the store is unusable afterwards."""
