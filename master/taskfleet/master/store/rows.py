"""Rows to tasks and back, for the stores on SQL (SQLite and PostgreSQL), which
lay out a task alike and answer list_tasks and stats from alike queries."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

from taskfleet.common.model import (
    MissedTicks,
    QueueCounts,
    Schedule,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
)
from taskfleet.master.store.base import StorePolicy, TaskPage, TaskQuery, not_found

# States as stored; they are literals in the SQL so partial indexes can match.
PENDING, RUNNING = TaskState.PENDING.value, TaskState.RUNNING.value
SUCCEEDED, FAILED, CANCELLED = (
    TaskState.SUCCEEDED.value,
    TaskState.FAILED.value,
    TaskState.CANCELLED.value,
)
LOST_BY_KEPT = 20  # worker ids a task remembers for its WorkerLost message

# The columns task_from_row reads, in its order.
COLUMNS = """id, name, queue, payload, content_type, priority, max_attempts, timeout_s,
    not_before, idempotency_key, metadata, result_ttl_s, state, attempts, lease, worker_id,
    result, result_content_type, error_type, error_message, error_traceback,
    created_at, started_at, finished_at, lost_leases, expires_at, start_by,
    depends_on, pass_results, progress, progress_message, ckey, ckey_limit"""

# COLUMNS of a final task, NULLs of any other: PostgreSQL's get_final reads what a
# wait sends at once in one round trip. The final states are the highest
# (TaskState.is_final); SQLite took milliseconds over a one-row read with an IN
# per column.
FINAL_COLUMNS = ", ".join(
    f"CASE WHEN state >= {SUCCEEDED} THEN {column.strip()} END" for column in COLUMNS.split(",")
)


def spec_values(spec: TaskSpec) -> tuple[Any, ...]:
    """The spec's columns of a task row, from ``name`` to ``result_ttl_s`` in ``COLUMNS``."""
    return (
        spec.name,
        spec.queue,
        spec.payload,
        spec.content_type,
        spec.priority,
        spec.max_attempts,
        spec.timeout_s,
        spec.not_before,
        spec.idempotency_key,
        json.dumps(spec.metadata) if spec.metadata else "{}",
        spec.result_ttl_s,
    )


def default_expiry(policy: StorePolicy, now: float) -> float:
    """When a task finished ``now`` without a TTL of its own is deleted; 0 for never."""
    ttl_s = policy.result_ttl_s
    return now + ttl_s if ttl_s > 0 else 0.0


def lost_by_after(lost_by_json: str, worker_id: str) -> list[str]:
    """The workers a task has lost, once ``worker_id``'s lease lapsed too."""
    return [*json.loads(lost_by_json), worker_id][-LOST_BY_KEPT:]


def where_clause(
    query: TaskQuery, states: frozenset[TaskState], cursor: int | None, mark: str
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause (and its parameters, each written ``mark``) of the tasks
    ``query`` matches, in ``states`` unless empty, older than ``cursor``."""
    terms: list[str] = ["1 = 1"]
    params: list[Any] = []
    if query.queue:
        terms.append(f"queue = {mark}")
        params.append(query.queue)
    if query.name:
        terms.append(f"name = {mark}")
        params.append(query.name)
    if states:
        terms.append(f"state IN ({', '.join(str(int(s)) for s in sorted(states))})")
    if cursor is not None:
        terms.append(f"seq < {mark}")
        params.append(cursor)
    return " AND ".join(terms), tuple(params)


def page(rows: Sequence[Sequence[Any]], limit: int) -> TaskPage:
    """The page of up to ``limit + 1`` rows selected as ``seq, COLUMNS``."""
    more = len(rows) > limit
    return TaskPage(
        [task_from_row(row[1:]) for row in rows[:limit]],
        rows[limit - 1][0] if more and limit else None,
    )


def in_order(rows: Iterable[Sequence[Any]], task_ids: Sequence[str]) -> list[Task]:
    """The tasks of ``rows`` in the order of ``task_ids``; raises NotFound for a missing one."""
    by_id = {task.id: task for task in map(task_from_row, rows)}
    for task_id in task_ids:
        if task_id not in by_id:
            raise not_found(task_id)
    return [by_id[task_id] for task_id in task_ids]


def final_ids(known: Iterable[tuple[str, object]], task_ids: Sequence[str]) -> list[str]:
    """Those of ``task_ids`` that are final, in order, from ``(id, whether final)``
    of each known task; raises NotFound naming the first unknown one."""
    is_final = dict(known)
    final: list[str] = []
    for task_id in task_ids:
        if task_id not in is_final:
            raise not_found(task_id)
        if is_final[task_id]:
            final.append(task_id)
    return final


# PENDING tasks per queue and name (store.pending_names), in qmark style.
PENDING_NAMES = f"""SELECT queue, name, count(*) FROM tasks WHERE state = {PENDING}
    GROUP BY queue, name ORDER BY count(*) DESC, queue, name LIMIT ?"""


# For each queue with PENDING tasks, the earliest ready_at among them (the store's
# oldest_pending): one probe of tasks_pending_since per queue. A task delayed or
# waiting for parents has a later ready_at than any ready one (Inf while waiting),
# so an earliest ready_at still in the future means that no task is ready.
OLDEST_PENDING = f"""SELECT c.queue, (SELECT t.ready_at FROM tasks t
    WHERE t.state = {PENDING} AND t.queue = c.queue ORDER BY t.ready_at LIMIT 1)
    FROM counts c WHERE c.state = {PENDING} AND c.n > 0"""


def oldest_ready(rows: Iterable[Sequence[Any]], now: float) -> dict[str, float]:
    """``oldest_pending`` from the (queue, earliest ready_at) rows of OLDEST_PENDING."""
    return {queue: at for queue, at in rows if at is not None and at <= now}


def queue_counts(rows: Iterable[Sequence[Any]]) -> list[QueueCounts]:
    """Stats from (queue, state, n) rows sorted by queue."""
    by_queue: dict[str, dict[TaskState, int]] = {}
    for queue, state, n in rows:
        by_queue.setdefault(queue, dict.fromkeys(TaskState, 0))[TaskState(state)] = n
    return [QueueCounts(queue, counts) for queue, counts in by_queue.items()]


def task_from_row(row: Sequence[Any]) -> Task:
    """A Task from a row selected as ``COLUMNS``."""
    (
        task_id,
        name,
        queue,
        payload,
        content_type,
        priority,
        max_attempts,
        timeout_s,
        not_before,
        idempotency_key,
        metadata,
        result_ttl_s,
        state,
        attempts,
        lease,
        worker_id,
        result,
        result_content_type,
        error_type,
        error_message,
        error_traceback,
        created_at,
        started_at,
        finished_at,
        lost_leases,
        expires_at,
        start_by,
        depends_on,
        pass_results,
        progress,
        progress_message,
        ckey,
        ckey_limit,
    ) = row
    # Positional, and no JSON parse or enum call for the common defaults: this
    # runs for every row the master leases, records or reports.
    spec = TaskSpec(
        name,
        queue,
        payload,
        content_type,
        priority,
        max_attempts,
        timeout_s,
        not_before,
        idempotency_key,
        json.loads(metadata) if metadata != "{}" else {},
        result_ttl_s,
        start_by,
        tuple(json.loads(depends_on)) if depends_on != "[]" else (),
        pass_results == 1,  # the mode of store/deps.py: 1 each, 2 as one list
        pass_results == 2,
        ckey,
        ckey_limit,
    )
    error = None if error_type is None else TaskError(error_type, error_message, error_traceback)
    return Task(
        task_id,
        spec,
        _STATES.get(state) or TaskState(state),
        attempts,
        lease,
        result,
        result_content_type,
        error,
        worker_id,
        created_at,
        started_at,
        finished_at,
        lost_leases,
        expires_at,
        progress,
        progress_message,
    )


_STATES = {int(state): state for state in TaskState}


# The columns schedule_from_row reads, in its order; also the INSERT's.
SCHEDULE_COLUMNS = """id, spec, cron, interval_s, timezone, paused, missed, next_fire, last_fire,
    created_at"""


def schedule_row(schedule: Schedule) -> tuple[Any, ...]:
    """The values of ``SCHEDULE_COLUMNS`` for ``schedule``; its spec as JSON."""
    spec = dataclasses.asdict(schedule.spec)
    spec["payload"] = base64.b64encode(schedule.spec.payload).decode()
    return (
        schedule.id,
        json.dumps(spec),
        schedule.cron,
        schedule.interval_s,
        schedule.timezone,
        schedule.paused,
        int(schedule.missed),
        schedule.next_fire,
        schedule.last_fire,
        schedule.created_at,
    )


def schedule_from_row(row: Sequence[Any]) -> Schedule:
    """A Schedule from a row selected as ``SCHEDULE_COLUMNS``."""
    schedule_id, spec_json, cron, interval_s, timezone, paused, missed, *times = row
    spec = json.loads(spec_json)
    spec["payload"] = base64.b64decode(spec["payload"])
    spec["depends_on"] = tuple(spec.get("depends_on", ()))
    return Schedule(
        schedule_id,
        TaskSpec(**spec),
        cron,
        interval_s,
        timezone,
        bool(paused),
        MissedTicks(missed),
        *times,
    )
