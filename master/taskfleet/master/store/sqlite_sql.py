"""The SQLite store's statements shared by several methods, the SET clause
that applies an outcome to its task's row, and the per-queue counts that the
write methods keep."""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Iterable
from typing import Any

from taskfleet.common.model import Outcome, Task, TaskSpec, TaskState
from taskfleet.master.store.deps import SqlDeps
from taskfleet.master.store.rows import (
    CANCELLED,
    FAILED,
    PENDING,
    SUCCEEDED,
    spec_values,
)
from taskfleet.master.store.sqlite_schema import READY

DEPS = SqlDeps("?", "")

INSERT = """INSERT INTO tasks (id, name, queue, payload, content_type, priority, max_attempts,
    timeout_s, not_before, idempotency_key, metadata, result_ttl_s, state, ready, ready_at,
    created_at, start_by, ckey, ckey_limit)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

# A finished task's deletion time: its own TTL, else the policy's (passed in as
# the second parameter, already added to now; 0 for never).
EXPIRES = "expires_at = CASE WHEN result_ttl_s > 0 THEN ? + result_ttl_s ELSE ? END"

# INDEXED BY makes a plan that cannot use the intended index an error, not a table scan.
CANDIDATES_BY_NAME = f"""SELECT -priority, seq FROM tasks INDEXED BY tasks_ready_by_name
    WHERE {READY} AND queue = ? AND name = ? ORDER BY priority DESC, seq LIMIT ?"""
CANDIDATES_BY_QUEUE = f"""SELECT -priority, seq FROM tasks INDEXED BY tasks_ready_by_queue
    WHERE {READY} AND queue = ? ORDER BY priority DESC, seq LIMIT ?"""


def without_keys(candidates: str) -> str:
    """``candidates`` passing over tasks whose concurrency key is in a JSON list,
    the parameter before the LIMIT."""
    return candidates.replace(
        " ORDER BY ", " AND ckey NOT IN (SELECT value FROM json_each(?)) ORDER BY ", 1
    )


def task_row(task_id: str, spec: TaskSpec, now: float) -> tuple[Any, ...]:
    """The values of ``INSERT`` for a new task."""
    ready_at = max(spec.not_before, now)
    return (
        task_id,
        *spec_values(spec),
        PENDING,
        int(ready_at <= now),
        ready_at,
        now,
        spec.expires_at,
        spec.concurrency_key,
        spec.concurrency_limit,
    )


def known_id(db: sqlite3.Connection, key: str) -> str | None:
    # The literal `!= ''` term lets SQLite use the partial unique index.
    row = db.execute(
        "SELECT id FROM tasks WHERE idempotency_key = ? AND idempotency_key != ''", (key,)
    ).fetchone()
    return None if row is None else str(row[0])


def outcome_update(
    outcome: Outcome, now: float, expiry: tuple[float, float], delay_s: float | None
) -> tuple[str, tuple[Any, ...]]:
    """The SET clause and its parameters that apply ``outcome`` to its task's row;
    ``expiry`` holds the parameters of ``EXPIRES``; a FAILED outcome runs again
    after ``delay_s`` unless it is None. Its state is final (``base.check_outcomes``)."""
    if outcome.state is TaskState.SUCCEEDED:
        return (
            f"""state = {SUCCEEDED}, result = ?, result_content_type = ?, error_type = NULL,
            error_message = NULL, error_traceback = NULL, finished_at = ?, {EXPIRES}""",
            (outcome.result, outcome.result_content_type, now, *expiry),
        )
    if outcome.state is TaskState.CANCELLED:
        error = outcome.error
        if error is None:
            return f"state = {CANCELLED}, finished_at = ?, {EXPIRES}", (now, *expiry)
        return (  # with why, as when it expired unstarted
            f"""state = {CANCELLED}, error_type = ?, error_message = ?, error_traceback = ?,
            finished_at = ?, {EXPIRES}""",
            (error.type, error.message, error.traceback, now, *expiry),
        )
    error = outcome.error
    error_params = (
        (None, None, None) if error is None else (error.type, error.message, error.traceback)
    )
    error_set = "error_type = ?, error_message = ?, error_traceback = ?"
    if delay_s is None:
        return (
            f"state = {FAILED}, {error_set}, finished_at = ?, {EXPIRES}",
            (*error_params, now, *expiry),
        )
    ready_at = now + delay_s
    return (
        f"state = {PENDING}, ready = ?, ready_at = ?, {error_set}",
        (int(ready_at <= now), ready_at, *error_params),
    )


_ADD_COUNTS = """INSERT INTO counts (queue, state, n) VALUES (?, ?, ?)
    ON CONFLICT (queue, state) DO UPDATE SET n = n + excluded.n"""
# A queue whose last task is gone leaves stats, so names come and go freely.
_DROP_EMPTY = """DELETE FROM counts WHERE queue = ?
    AND (SELECT sum(n) FROM counts WHERE queue = ?) = 0"""


class Counts:
    """The changes one write transaction makes to the ``counts`` table (tasks per
    queue and state, which stats() reads in O(queues)), gathered per (queue,
    state) and written by ``apply`` just before it commits: as exact as a
    trigger, even across a crash, at a few statements a batch where SQLite's
    triggers (run once per row) cost two a task."""

    def __init__(self) -> None:
        self._deltas: dict[tuple[str, int], int] = {}
        self._shrunk: set[str] = set()  # queues that lost tasks, maybe their last

    def add(self, queue: str, state: int, n: int = 1) -> None:
        """``n`` tasks of ``queue`` came into ``state``: new ones, or deleted if ``n`` < 0."""
        key = (queue, state)
        self._deltas[key] = self._deltas.get(key, 0) + n
        if n < 0:
            self._shrunk.add(queue)

    def move(self, queue: str, old: int, new: int, n: int = 1) -> None:
        """``n`` tasks of ``queue`` went from state ``old`` to ``new``."""
        if old != new:
            deltas = self._deltas
            deltas[queue, old] = deltas.get((queue, old), 0) - n
            deltas[queue, new] = deltas.get((queue, new), 0) + n

    def moved(self, tasks: Iterable[Task], old: int) -> None:
        """Each of ``tasks``, as it is now, went from state ``old`` to its present one."""
        # Counted in C first: a batch has few (queue, state) pairs and many tasks.
        moves = collections.Counter((task.spec.queue, task.state) for task in tasks)
        for (queue, new), n in moves.items():
            self.move(queue, old, new, n)

    def apply(self, db: sqlite3.Connection) -> None:
        """Write the changes gathered so far, in ``db``'s open transaction."""
        changes = [(queue, int(state), n) for (queue, state), n in self._deltas.items() if n]
        if changes:
            db.executemany(_ADD_COUNTS, changes)
        if self._shrunk:
            db.executemany(_DROP_EMPTY, [(queue, queue) for queue in self._shrunk])
        self.clear()

    def clear(self) -> None:
        """Forget the changes gathered (those of a transaction rolled back)."""
        self._deltas.clear()
        self._shrunk.clear()
