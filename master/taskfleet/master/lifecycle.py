"""The one front door for task state changes in the master.

Every change (submit, lease, extend, record, release, cancel, expire, retry,
purge, prune, the tasks schedules fire) goes through ``Lifecycle``: it applies
the change to the store, then tells each registered ``LifecycleListener`` what
happened. The servicers,
the manager bridge and the reaper are thin callers; what follows a change
(WaitTasks events, metrics, wake-ups of idle workers, a revoke to the worker
of a cancelled task) is written once, as a listener. A change made by another
master on a shared store enters through the same listener calls.

Calls block on the store, so an asyncio caller runs them on an executor.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Collection, Sequence

from taskfleet.common.errors import FailedPrecondition, InvalidArgument
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    Outcome,
    Progress,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
)
from taskfleet.master import concurrency, schedules
from taskfleet.master.ratelimit import MAX_PENDING_NAMES, RateLimiter
from taskfleet.master.store.base import FINAL_STATES, FiredTick, Store, TaskQuery
from taskfleet.master.store.deps import ended_by_parents
from taskfleet.master.validation import validate_specs

log = logging.getLogger("taskfleet.master.lifecycle")

# Rows deleted per store transaction by prune and purge: small enough that a
# submit or lease waiting for the store lock is held up by milliseconds.
DELETE_BATCH = 500
# Transactions one prune() call runs at most, so a reaper tick stays short
# however large the backlog; the next tick goes on where it stopped.
MAX_PRUNE_BATCHES = 20


class LifecycleListener:
    """What follows a state change; override the hooks you need (each is a no-op).

    Hooks run on the caller's thread right after the store committed, so they
    must be quick and must not raise; one that raises is logged and skipped.
    """

    def submitted(self, tasks: Sequence[TaskSpec]) -> None:
        """New tasks were accepted (repeats of an idempotency key included)."""

    def finished(self, tasks: Sequence[Task]) -> None:
        """Tasks reached a final state; each is reported exactly once."""

    def progressed(self, updates: Sequence[Progress]) -> None:
        """Running tasks said how far they are (each update stored, none stale)."""

    def retried(self, tasks: Sequence[Task]) -> None:
        """Failed attempts whose tasks go back to PENDING after a backoff."""

    def lost(self, tasks: Sequence[Task]) -> None:
        """Leases lapsed: their workers died, hung or were cut off."""

    def cancelled(self, task: Task) -> None:
        """A task was cancelled; if it was RUNNING, ``task.worker_id`` must stop it."""

    def pruned(self, count: int) -> None:
        """Finished tasks were deleted (their result TTL ran out, or a purge)."""

    def work_available(
        self, queues: Collection[str] | None, names: Collection[str] | None, tasks: int | None
    ) -> None:
        """``tasks`` tasks named one of ``names`` may be ready in ``queues``: idle
        workers that serve them should look. None for any of them means unknown
        (any queue, any name, any number)."""


class Lifecycle:
    """Applies state changes to ``store`` and reports them to the listeners."""

    def __init__(
        self,
        store: Store,
        *,
        max_payload_bytes: int,
        listeners: Sequence[LifecycleListener] = (),
        limiter: RateLimiter | None = None,
    ) -> None:
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self._listeners = list(listeners)
        self.limiter = limiter  # --rate-limit; see ratelimit.py
        self._keys = concurrency.KeyLimits(store)

    def add_listener(self, listener: LifecycleListener) -> None:
        self._listeners.append(listener)

    # -- producers -------------------------------------------------------------

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Validate and enqueue ``specs``; their ids in order."""
        validate_specs(specs, self.max_payload_bytes)
        task_ids = self.store.submit(specs, time.time())
        self._emit("submitted", specs)
        self._work_available(specs)
        return task_ids

    def cancel(self, task_id: str) -> Task:
        """Cancel the task, and with it every task that waits for it (ParentFailed)."""
        task, *dependents = self.store.cancel(task_id, time.time())
        self._emit("cancelled", task)
        self._emit("finished", [task, *dependents])
        return task

    def retry(self, task_id: str) -> Task:
        # A dependent ended by its parents (ParentFailed, ArgumentsTooLarge) would
        # run without their results: retry the parent, and submit it again.
        error = self.store.get(task_id).error
        if ended_by_parents(error):
            raise FailedPrecondition(
                f"task {task_id} was ended by its parents ({error.type if error else ''}); "
                "retry the parent and submit this task again"
            )
        task = self.store.retry(task_id, time.time())
        self._work_available([task.spec])
        return task

    def purge(self, query: TaskQuery) -> int:
        """Delete every finished task ``query`` matches, in short transactions."""
        if not (query.states or FINAL_STATES) <= FINAL_STATES:
            raise InvalidArgument(
                "states: only finished tasks (SUCCEEDED, FAILED, CANCELLED) can be purged"
            )
        return self._delete(lambda: self.store.purge(query, DELETE_BATCH), None)

    def fire_schedules(self, limit: int) -> list[str]:
        """Submit the task of each due tick of up to ``limit`` schedules; their ids.

        The store records each tick and inserts its task in one transaction, so a
        tick that another master fired first submits nothing here."""
        now = time.time()
        specs, task_ids = [], []
        for schedule in self.store.due_schedules(now, limit):
            try:
                plan = schedules.plan(schedule, now)
            except Exception:  # one broken schedule must not stop the others
                log.exception("cannot plan the next tick of schedule %s", schedule.id)
                continue
            fired = None
            if plan.tick is not None:
                fired = FiredTick(plan.tick, schedules.fired_spec(schedule, plan.tick))
            task_id = self.store.fire_schedule(
                schedule.id, schedule.next_fire, plan.next_fire, fired, now
            )
            if task_id is not None and fired is not None:
                specs.append(fired.spec)
                task_ids.append(task_id)
        if specs:
            self._emit("submitted", specs)
            self._work_available(specs)
        return task_ids

    # -- workers ---------------------------------------------------------------

    def lease(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str] | None,
        limit: int,
        lease_s: float,
    ) -> list[Lease]:
        """Up to ``limit`` ready tasks for the worker. A task past the time it had to
        start by (``TaskSpec.expires_at``) is not handed out: it ends CANCELLED
        with error type Expired, and the worker's slot goes to the next task.
        Tasks of a rate-limited name beyond its tokens, or of a concurrency key
        beyond its limit (concurrency.py), go back to PENDING at once."""
        now = time.time()
        if self.limiter is not None:
            names = self.limiter.open_names(names, self._pending_names)
            if names is not None and not names:
                return []
        leases = self.store.lease(
            worker_id,
            queues,
            names,
            limit,
            lease_s,
            now,
            exclude_keys=self._keys.full(),
        )
        leases, excess = self._keys.admit(leases)
        if self.limiter is not None and leases:
            leases, over_rate = self.limiter.admit(leases)
            excess += over_rate
        if excess:
            self.store.release(excess, now)
        expired = [lease for lease in leases if 0 < lease.task.spec.expires_at <= now]
        if not expired:
            return leases
        self.record([_expired(lease) for lease in expired])
        self._work_available([lease.task.spec for lease in expired])  # slots came free
        gone = {lease.task.id for lease in expired}
        return [lease for lease in leases if lease.task.id not in gone]

    def extend(self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float) -> list[LeaseRef]:
        """Renew ``refs``; the stale ones, which the worker must stop."""
        return self.store.extend(worker_id, refs, lease_s, time.time()) if refs else []

    def set_progress(self, updates: Sequence[Progress]) -> None:
        """Store how far running tasks are; stale leases' updates are ignored."""
        stored = self.store.set_progress(updates) if updates else []
        if stored:
            self._emit("progressed", stored)

    def record(self, outcomes: Sequence[Outcome]) -> list[Task]:
        """Apply attempt outcomes; the tasks they changed."""
        changed = self.store.record(outcomes, time.time()) if outcomes else []
        # The store adds the dependents the outcomes readied or cancelled.
        recorded = {o.ref.task_id for o in outcomes}
        finals = [t for t in changed if t.state.is_final]
        retried = [t for t in changed if t.state is TaskState.PENDING and t.id in recorded]
        readied = [t for t in changed if t.state is TaskState.PENDING and t.id not in recorded]
        if finals:
            self._emit("finished", finals)
        if retried:
            self._emit("retried", retried)
        if retried or readied:
            self._work_available([t.spec for t in retried + readied])
        return changed

    def release(self, refs: Sequence[LeaseRef]) -> int:
        """Give back leases of tasks that never started; how many were valid."""
        released = self.store.release(refs, time.time()) if refs else 0
        if released:
            self._emit("work_available", None, None, released)
        return released

    # -- housekeeping ----------------------------------------------------------

    def expire(self) -> list[Task]:
        """Return lapsed leases to PENDING (or end tasks that lost too many)."""
        lapsed = self.store.expire(time.time())
        if not lapsed:
            return lapsed
        # The store adds the dependents of tasks that ended WorkerLost.
        dependents = [t for t in lapsed if t.state.is_final and ended_by_parents(t.error)]
        lapsed = [t for t in lapsed if not (t.state.is_final and ended_by_parents(t.error))]
        finals = [t for t in lapsed if t.state.is_final]
        log.warning(
            "%d leases lapsed: %s%s",
            len(lapsed),
            ", ".join(f"{t.id} (worker {t.worker_id})" for t in lapsed[:5]),
            f"; {len(finals)} tasks FAILED WorkerLost" if finals else "",
        )
        self._emit("lost", lapsed)
        if finals or dependents:
            self._emit("finished", finals + dependents)
        if len(finals) < len(lapsed):
            self._work_available([t.spec for t in lapsed if not t.state.is_final])
        return lapsed

    def prune(self) -> int:
        """Delete finished tasks whose TTL ran out, a bounded number per call."""
        return self._delete(lambda: self.store.prune(time.time(), DELETE_BATCH), MAX_PRUNE_BATCHES)

    def _delete(self, batch: Callable[[], int], max_batches: int | None) -> int:
        """Run ``batch`` (one short transaction deleting up to DELETE_BATCH tasks)
        until it deletes fewer, or ``max_batches`` times; how many it deleted."""
        total = 0
        for _ in itertools.repeat(None) if max_batches is None else range(max_batches):
            deleted = batch()
            total += deleted
            if deleted < DELETE_BATCH:
                break
        if total:
            self._emit("pruned", total)
        return total

    def _pending_names(self) -> set[str]:
        return {p.name for p in self.store.pending_names(MAX_PENDING_NAMES)}

    def _work_available(self, specs: Sequence[TaskSpec]) -> None:
        self._emit("work_available", {s.queue for s in specs}, {s.name for s in specs}, len(specs))

    def _emit(self, hook: str, *args: object) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, hook)(*args)
            except Exception:
                log.exception("lifecycle listener %s.%s failed", type(listener).__name__, hook)


def _expired(lease: Lease) -> Outcome:
    late_s = time.time() - lease.task.spec.expires_at
    message = f"not started by its expires_at ({late_s:.3f} s ago); it did not run"
    return Outcome(lease.ref, TaskState.CANCELLED, error=TaskError("Expired", message))
