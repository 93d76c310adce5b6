"""Task dependencies, shared by the stores: a task with parents (``depends_on``)
waits, PENDING but never leased, until every parent SUCCEEDED; a parent that
ends FAILED or CANCELLED ends its waiting dependents CANCELLED ``ParentFailed``,
transitively. Both happen in the store, in the transaction that ends the
parent, so no master polls for them and every master sharing a database sees
the child become ready at once.

A waiting task is kept as a delayed one whose ready time is infinite, so the
lease path needs no new condition; the SQL stores count its unfinished parents
in ``waiting`` and list the edges to them in ``task_deps`` (an edge is deleted
when its parent ends).
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from taskfleet.common.batching import MAX_ITEM_BYTES
from taskfleet.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from taskfleet.common.model import TaskError, TaskSpec, TaskState

PARENT_FAILED = "ParentFailed"
ARGUMENTS_TOO_LARGE = "ArgumentsTooLarge"
# Children updated per statement: far below SQLite's and PostgreSQL's limits on
# parameters, however many children one parent has.
_CHUNK = 1_000
# The ready time of a task that waits for its parents: later than any real time.
WAITING_AT = math.inf


def resolve(specs: Sequence[TaskSpec], ids: Sequence[str]) -> list[tuple[str, ...]]:
    """Each spec's parents as task ids, ``$N`` replaced by the id given to spec N
    (validation made sure N points backwards)."""
    return [
        tuple(ids[int(p[1:])] if p.startswith("$") else p for p in spec.depends_on)
        for spec in specs
    ]


def check_parent(field: str, parent_id: str, state: TaskState | None) -> None:
    """Refuse a parent that does not exist (INVALID_ARGUMENT) or that already
    failed (FAILED_PRECONDITION: the new task could never run)."""
    if state is None:
        raise InvalidArgument(
            f"{field}: no task {parent_id} (finished tasks are deleted when their "
            "result TTL runs out)"
        )
    if state in (TaskState.FAILED, TaskState.CANCELLED):
        raise FailedPrecondition(
            f"{field}: task {parent_id} already ended {state.name}, so this task could never run"
        )


def check_size(field: str, payload: bytes) -> None:
    """Refuse at submit a task that its finished parents' results make too large."""
    error = too_large(payload)
    if error is not None:
        raise ResourceExhausted(f"{field}.depends_on: {error.message}")


def parent_failed_error(parent_id: str, state: TaskState) -> TaskError:
    """The error of a dependent cancelled because ``parent_id`` ended in ``state``."""
    return TaskError(PARENT_FAILED, f"parent task {parent_id} ended {state.name}")


def ended_by_parents(error: TaskError | None) -> bool:
    """Whether a task was ended by its parents rather than run."""
    return error is not None and error.type in (PARENT_FAILED, ARGUMENTS_TOO_LARGE)


def results_mode(spec: TaskSpec) -> int:
    """How a task takes its parents' results, as the SQL stores keep it: 0 not at
    all, 1 each prepended (``pass_results``), 2 as one list (``gather_results``)."""
    return 2 if spec.gather_results else int(spec.pass_results)


def with_results(payload: bytes, results: Sequence[bytes], mode: int) -> bytes:
    """``payload`` with the parents' JSON ``results`` prepended to its args, each
    (mode 1) or as one list (mode 2)."""
    body = json.loads(payload) if payload else {}
    values = [_value(r) for r in results]
    body["args"] = [*(values if mode == 1 else [values]), *body.get("args", [])]
    body.setdefault("kwargs", {})
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def too_large(payload: bytes) -> TaskError | None:
    """The error of a task whose parents' results made its arguments larger than
    any master hands out, or None."""
    if len(payload) <= MAX_ITEM_BYTES:
        return None
    return TaskError(
        ARGUMENTS_TOO_LARGE,
        f"its parents' results make {len(payload)} bytes of arguments, over the limit of "
        f"{MAX_ITEM_BYTES}; return large data on shared storage and pass its path instead",
    )


def _value(result: bytes) -> Any:
    """A parent's result as an argument: its JSON value, or its text when a worker
    not written in Python sent another content type (never an error here, which
    would undo the parent's own outcome)."""
    try:
        return json.loads(result) if result else None
    except ValueError:
        return result.decode(errors="replace")


class SqlDeps:
    """Dependencies for the SQL stores, in the caller's transaction ``db`` (a
    sqlite3 or psycopg connection); ``mark`` is the placeholder (``?`` or ``%s``)
    and ``lock`` the clause that keeps a parent from ending while a child is
    added (PostgreSQL's ``FOR SHARE``; SQLite locks the whole file anyway)."""

    def __init__(self, mark: str, lock: str) -> None:
        self._m = mark
        self._lock = lock

    def _q(self, sql: str, n: int = 0) -> str:
        marks = ", ".join([self._m] * n)
        return sql.replace("?", self._m).replace("(*)", f"({marks})")

    def add(
        self,
        db: Any,
        specs: Sequence[TaskSpec],
        ids: Sequence[str],
        new: Sequence[bool],
        now: float,
    ) -> None:
        """Make the newly inserted ``specs`` (``new[i]``) that have parents wait for
        them; a parent already SUCCEEDED counts as done (its result is passed now)."""
        parents_of = resolve(specs, ids)
        for i, spec in enumerate(specs):
            parents = parents_of[i]
            if not new[i] or not parents:
                continue
            unique = list(dict.fromkeys(parents))
            rows = db.execute(
                self._q(
                    f"SELECT id, state, result FROM tasks WHERE id IN (*){self._lock}", len(unique)
                ),
                unique,
            ).fetchall()
            found = {r[0]: (TaskState(r[1]), bytes(r[2])) for r in rows}
            for j, parent in enumerate(parents):
                state = found.get(parent, (None, b""))[0]
                check_parent(f"tasks[{i}].depends_on[{j}]", parent, state)
            open_parents = [p for p in unique if found[p][0] is not TaskState.SUCCEEDED]
            payload = spec.payload
            mode = results_mode(spec)
            if not open_parents and mode:
                payload = with_results(payload, [found[p][1] for p in parents], mode)
                check_size(f"tasks[{i}]", payload)
            ready_at = max(spec.not_before, now) if not open_parents else WAITING_AT
            db.execute(
                self._q(
                    """UPDATE tasks SET depends_on = ?, pass_results = ?, waiting = ?,
                    ready = ?, ready_at = ?, payload = ? WHERE id = ?"""
                ),
                (
                    json.dumps(list(parents)),
                    mode,
                    len(open_parents),
                    ready_at <= now,
                    ready_at,
                    payload,
                    ids[i],
                ),
            )
            if open_parents:
                values = ", ".join(["(?, ?)"] * len(open_parents))
                db.execute(
                    self._q(f"INSERT INTO task_deps (parent, child) VALUES {values}"),
                    [value for p in open_parents for value in (p, ids[i])],
                )

    def settle(
        self,
        db: Any,
        ended: Sequence[tuple[str, TaskState]],
        now: float,
        default_expiry: float,
        columns: str,
        from_row: Callable[[Any], Any],
    ) -> list[Any]:
        """Follow parents that just ended (id, final state): ready the children whose
        last parent succeeded, cancel the dependents of failed ones. The tasks
        changed, as they are now, readied ones first."""
        ready: list[str] = []
        cancelled: list[Any] = []  # and failed: ended by their parents
        # One round per generation: the edges of every parent that ended in it.
        state_of = {task_id: state for task_id, state in ended if state.is_final}
        while state_of:
            edges = db.execute(
                self._q(
                    "DELETE FROM task_deps WHERE parent IN (*) RETURNING parent, child",
                    len(state_of),
                ),
                list(state_of),
            ).fetchall()
            succeeded = [c for p, c in edges if state_of[p] is TaskState.SUCCEEDED]
            readied, unfit = self._ready(db, succeeded, now) if succeeded else ([], [])
            ready += readied
            ending = [(c, TaskState.FAILED, error) for c, error in unfit]
            failed_parent = {c: p for p, c in edges if state_of[p] is not TaskState.SUCCEEDED}
            ending += [
                (c, TaskState.CANCELLED, parent_failed_error(p, state_of[p]))
                for c, p in failed_parent.items()
            ]
            next_round: dict[str, TaskState] = {}
            for child, state, error in ending:
                row = db.execute(
                    self._q(
                        f"""UPDATE tasks SET state = {state.value}, error_type = ?,
                        error_message = ?, error_traceback = '', finished_at = ?, expires_at =
                        CASE WHEN result_ttl_s > 0 THEN ? + result_ttl_s ELSE ? END
                        WHERE id = ? AND state = {TaskState.PENDING.value} RETURNING {columns}"""
                    ),
                    (error.type, error.message, now, now, default_expiry, child),
                ).fetchone()
                if row is not None:
                    cancelled.append(from_row(row))
                    next_round[child] = state
            state_of = next_round
        if not ready:
            return cancelled
        rows = []
        for start in range(0, len(ready), _CHUNK):
            chunk = ready[start : start + _CHUNK]
            sql = self._q(f"SELECT {columns} FROM tasks WHERE id IN (*)", len(chunk))
            rows += db.execute(sql, chunk).fetchall()
        return [*map(from_row, rows), *cancelled]

    def _count_down(self, db: Any, n: int, ids: list[str]) -> list[Any]:
        """Take ``n`` succeeded parents off each of ``ids``; their rows as now."""
        rows: list[Any] = db.execute(
            self._q(
                f"""UPDATE tasks SET waiting = waiting - ? WHERE id IN (*)
                AND state = {TaskState.PENDING.value}
                RETURNING id, waiting, not_before, pass_results, depends_on, payload""",
                len(ids),
            ),
            (n, *ids),
        ).fetchall()
        return rows

    def _ready(
        self, db: Any, children: list[str], now: float
    ) -> tuple[list[str], list[tuple[str, TaskError]]]:
        """One parent of each of ``children`` succeeded; ready those with none left.
        Those, and the ones whose arguments the results made too large (to end
        FAILED with that error)."""
        # Parents that ended in one call: a child may have lost several at once.
        by_count: dict[int, list[str]] = {}
        for child, n in collections.Counter(children).items():
            by_count.setdefault(n, []).append(child)
        rows = []
        for n, all_ids in by_count.items():
            for start in range(0, len(all_ids), _CHUNK):
                rows += self._count_down(db, n, all_ids[start : start + _CHUNK])
        readied: list[str] = []
        unfit: list[tuple[str, TaskError]] = []
        for task_id, waiting, not_before, mode, depends_on, payload in rows:
            if waiting > 0:
                continue
            payload = bytes(payload)
            if mode:
                parents = json.loads(depends_on)
                unique = list(dict.fromkeys(parents))
                found = dict(
                    db.execute(
                        self._q("SELECT id, result FROM tasks WHERE id IN (*)", len(unique)),
                        unique,
                    ).fetchall()
                )
                payload = with_results(payload, [bytes(found.get(p, b"")) for p in parents], mode)
                error = too_large(payload)
                if error is not None:
                    unfit.append((task_id, error))
                    continue
            ready_at = max(not_before, now)
            db.execute(
                self._q("UPDATE tasks SET ready = ?, ready_at = ?, payload = ? WHERE id = ?"),
                (ready_at <= now, ready_at, payload, task_id),
            )
            readied.append(task_id)
        return readied, unfit
