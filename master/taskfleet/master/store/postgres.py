"""The PostgreSQL store: every task in one table, shared by the master's store threads.

Each method is as few statements as it can be, on a connection from a small
pool. The connections autocommit: a method of one statement is atomic by
itself and costs one round trip, not three; only those of several that must
hold together (submit, record of a failure, expire) open a transaction.

Leasing claims rows with ``FOR UPDATE SKIP LOCKED``, so two leases running
at once never wait on each other nor hand out a task twice; extend, record
and release name the lease they fence in their ``WHERE`` clause, so the
database itself refuses a stale ref. Partial indexes hold only the rows a hot
query needs, as in the SQLite store, whose semantics this one mirrors exactly
(see sqlite.py for the model of each method). Per-queue counts are kept by
statement triggers: at 100,000 tasks stats() takes 1 ms where a GROUP BY took
50 ms, for 2% on submit and 14% on lease (measured, fsync off).

Every commit waits until its WAL is on disk (the server's synchronous_commit)
but a lease's claim, whose transaction turns it off for itself alone
(``set_config(..., true)``). A claim lost in a crash of the server, up to
three wal_writer_delay (0.6 s by default) of them, leaves its tasks PENDING,
to run again: at-least-once allows that, and it loses no task. A lost outcome
would lose one, since the worker forgets it once acknowledged; so record
waits, as do submit (the client holds the ids), extend and release, and WAL
reaches the disk in order: an outcome on disk carries its claim with it.
A lost claim's lease number is never handed out again: the first claim after
a crash starts a new lease epoch, on disk before any lease of it is used, above
every number of the epochs before (postgres_sql.CLAIM), so a worker still
running the lost claim holds a stale ref.
Not waiting for the flush lets a lease give up its locks (the counts rows that
every writer updates among them) a flush sooner.

Any number of masters can share one database: every statement is correct
against the others' (claims skip locked rows, updates are fenced), and
housekeeping (``expire``, ``prune``) skips rows another master holds, so all
masters run it at once and each lapsed lease is returned once. What the
masters tell each other (wake-ups, results, revocations) goes over the bus
(postgres_bus.py).

The schema is in postgres_schema.py, the longer statements in postgres_sql.py,
the connection pool and its outage handling in postgres_pool.py, schedules in
postgres_schedules.py.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Collection, Sequence
from typing import Any

import psycopg

from taskfleet.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
)
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    Outcome,
    PendingName,
    Progress,
    QueueCounts,
    Task,
    TaskSpec,
    TaskState,
)
from taskfleet.common.store_urls import redacted
from taskfleet.master.store.base import (
    DEFAULT_POLICY,
    FINAL_STATES,
    KeyLoad,
    Store,
    StorePolicy,
    TaskPage,
    TaskQuery,
    attempts_used,
    check_outcomes,
    first_outcomes,
    new_task_id,
    not_found,
    retry_delay_s,
    worker_lost_error,
)
from taskfleet.master.store.postgres_bus import PostgresBus
from taskfleet.master.store.postgres_pool import CONNECT_TIMEOUT_S, first_line
from taskfleet.master.store.postgres_schedules import PostgresSchedules
from taskfleet.master.store.postgres_schema import migrate
from taskfleet.master.store.postgres_sql import (
    CLAIM_BY_NAME,
    CLAIM_BY_QUEUE,
    DELAYED,
    DEPS,
    EXPIRE,
    EXPIRES,
    FENCE,
    INSERT,
    NEW_LEASE_EPOCH,
    NO_LEASE_EPOCH,
    RECORD,
    REFS,
    ref_arrays,
    task_row,
    without_keys,
)
from taskfleet.master.store.rows import (
    CANCELLED,
    COLUMNS,
    FAILED,
    FINAL_COLUMNS,
    OLDEST_PENDING,
    PENDING,
    PENDING_NAMES,
    RUNNING,
    default_expiry,
    final_ids,
    in_order,
    lost_by_after,
    oldest_ready,
    page,
    queue_counts,
    task_from_row,
    where_clause,
)


class PostgresStore(PostgresSchedules, Store):
    """Durable store in the PostgreSQL database ``dsn`` names, migrated on open."""

    def __init__(
        self, dsn: str, policy: StorePolicy = DEFAULT_POLICY, *, prepare: bool = True
    ) -> None:
        self.policy = policy
        self._dsn = dsn
        self._prepare = prepare
        self._where = redacted(dsn)
        try:
            with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                migrate(conn, self._where)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot use {self._where}: {first_line(exc)}") from None
        self._pool = self._new_pool()
        self._lost_lock = threading.Lock()
        self._lost = ""  # why the database is unreachable, while it is

    def submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        keys = [spec.idempotency_key for spec in specs if spec.idempotency_key]

        def work(conn: psycopg.Connection[Any]) -> list[str]:
            known: dict[str, str] = {}
            if keys:
                rows = conn.execute(
                    "SELECT idempotency_key, id FROM tasks WHERE idempotency_key = ANY(%b)",
                    (keys,),
                ).fetchall()
                known = dict(rows)
            ids: list[str] = []
            columns: list[list[Any]] = [[] for _ in range(16)]
            for spec in specs:
                key = spec.idempotency_key
                if key and key in known:
                    ids.append(known[key])
                    continue
                task_id = new_task_id()
                if key:
                    known[key] = task_id
                row = task_row(task_id, spec, now)
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
                ids.append(task_id)
            inserted = set(columns[0])
            if columns[0]:
                conn.execute(INSERT, (PENDING, now, now, *columns))
            if with_parents:
                DEPS.add(conn, specs, ids, [task_id in inserted for task_id in ids], now)
            return ids

        with_parents = any(spec.depends_on for spec in specs)
        return self._run(work, atomic=bool(keys) or with_parents)

    def get(self, task_id: str) -> Task:
        return self.get_many([task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[Task]:
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE id = ANY(%b)", (list(task_ids),), binary=True
            ).fetchall()
        )
        return in_order(rows, task_ids)

    def get_final(self, task_ids: Sequence[str]) -> list[Task]:
        # One statement, so one round trip, whatever the mix of states.
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT id, {FINAL_COLUMNS} FROM tasks WHERE id = ANY(%b)",
                (list(task_ids),),
                binary=True,
            ).fetchall()
        )
        final = final_ids(((row[0], row[1] is not None) for row in rows), task_ids)
        return in_order((row[1:] for row in rows if row[1] is not None), final)

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
        if limit <= 0 or not queues or (names is not None and not names):
            return []
        params: dict[str, Any] = {
            "queues": list(dict.fromkeys(queues)),
            "limit": limit,
            "worker": worker_id,
            "now": now,
            "deadline": now + lease_s,
        }
        if names is None:
            sql = CLAIM_BY_QUEUE
        else:
            params["names"] = list(dict.fromkeys(names))
            sql = CLAIM_BY_NAME
        if exclude_keys:
            params["keys"] = sorted(exclude_keys)
            sql = without_keys(sql)

        def work(conn: psycopg.Connection[Any]) -> list[Any]:
            conn.execute(
                f"UPDATE tasks SET ready = true WHERE {DELAYED} AND ready_at <= %s", (now,)
            )
            # Rows in binary: numbers and bytea (the payload) need no parsing.
            try:
                return conn.execute(sql, params, binary=True).fetchall()
            except psycopg.Error as exc:
                if exc.sqlstate != NO_LEASE_EPOCH:
                    raise
            # No live epoch (the database's first claim, or the first since a crash):
            # the claim took nothing; start an epoch and claim again.
            conn.execute(NEW_LEASE_EPOCH)
            return conn.execute(sql, params, binary=True).fetchall()

        rows = self._run(work)
        rows.sort(key=lambda row: (-row[0], row[1]))  # RETURNING comes in no set order
        return [Lease(task_from_row(row[2:]), now + lease_s) for row in rows]

    def running_by_key(self) -> dict[str, KeyLoad]:
        rows = self._run(
            lambda conn: conn.execute(
                f"""SELECT ckey, count(*), min(ckey_limit) FROM tasks
                WHERE state = {RUNNING} AND ckey <> '' GROUP BY ckey"""
            ).fetchall()
        )
        return {key: KeyLoad(running, limit) for key, running, limit in rows}

    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        if not refs:
            return []
        params = {**ref_arrays(refs), "deadline": now + lease_s, "worker": worker_id}
        renewed = self._run(
            lambda conn: conn.execute(
                f"""UPDATE tasks t SET lease_deadline = %(deadline)s FROM {REFS}
                WHERE {FENCE} AND t.worker_id = %(worker)s RETURNING t.id, t.lease""",
                params,
            ).fetchall()
        )
        valid = set(renewed)
        return [ref for ref in refs if (ref.task_id, ref.lease) not in valid]

    def set_progress(self, updates: Sequence[Progress]) -> list[Progress]:
        if not updates:
            return []
        params = {
            **ref_arrays([u.ref for u in updates]),
            "fractions": [u.fraction for u in updates],
            "messages": [u.message for u in updates],
        }
        stored = self._run(
            lambda conn: conn.execute(
                """UPDATE tasks t SET progress = r.fraction, progress_message = r.message
                FROM unnest(%(ids)b::text[], %(leases)b::bigint[], %(fractions)b::float8[],
                    %(messages)b::text[]) AS r(id, lease, fraction, message)
                WHERE """
                + FENCE
                + " RETURNING t.id, t.lease",
                params,
            ).fetchall()
        )
        valid = {(task_id, lease) for task_id, lease in stored}
        return [u for u in updates if (u.ref.task_id, u.ref.lease) in valid]

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        check_outcomes(outcomes)
        unique = first_outcomes(outcomes)
        if not unique:
            return []
        failed = [o for o in unique if o.state is TaskState.FAILED]

        def work(conn: psycopg.Connection[Any]) -> list[Task]:
            used: dict[tuple[str, int], int] = {}
            if failed:
                rows = conn.execute(
                    f"""SELECT t.id, t.lease, t.attempts, t.attempt_base, t.lost_leases
                    FROM tasks t, {REFS} WHERE {FENCE} FOR UPDATE OF t""",
                    ref_arrays([o.ref for o in failed]),
                ).fetchall()
                used = {(row[0], row[1]): attempts_used(*row[2:]) for row in rows}
            params: dict[str, Any] = {
                **ref_arrays([o.ref for o in unique]),
                "states": [o.state.value for o in unique],
                "results": [o.result for o in unique],
                "types": [o.result_content_type for o in unique],
                "error_types": [o.error.type if o.error else None for o in unique],
                "messages": [o.error.message if o.error else None for o in unique],
                "tracebacks": [o.error.traceback if o.error else None for o in unique],
                "ready_ats": [self._retry_at(o, used, now) for o in unique],
                "now": now,
                "expiry": default_expiry(self.policy, now),
            }
            rows = conn.execute(RECORD, params, binary=True).fetchall()
            rows.sort(key=lambda row: row[0])
            changed = [task_from_row(row[1:]) for row in rows]
            return changed + self._settle(conn, changed, now)

        # Atomic: the dependents of the tasks that end are settled in the same transaction.
        return self._run(work, atomic=True)

    def _settle(self, conn: psycopg.Connection[Any], changed: list[Task], now: float) -> list[Task]:
        """The dependents of the tasks that just ended, readied or cancelled."""
        ended = [(t.id, t.state) for t in changed if t.state.is_final]
        expiry = default_expiry(self.policy, now)
        return DEPS.settle(conn, ended, now, expiry, COLUMNS, task_from_row) if ended else []

    def _retry_at(
        self, outcome: Outcome, used: dict[tuple[str, int], int], now: float
    ) -> float | None:
        """When a FAILED outcome's task runs again, or None if it ends (or is stale)."""
        count = used.get((outcome.ref.task_id, outcome.ref.lease))
        if outcome.state is not TaskState.FAILED or count is None:
            return None
        delay_s = retry_delay_s(self.policy, outcome, count)
        return None if delay_s is None else now + delay_s

    def retry(self, task_id: str, now: float) -> Task:
        def work(conn: psycopg.Connection[Any]) -> Any:
            row = conn.execute(
                f"""UPDATE tasks SET state = {PENDING}, ready = true, ready_at = %s,
                attempt_base = attempts, lost_leases = 0, lost_by = '[]', finished_at = 0,
                expires_at = 0 WHERE id = %s AND state IN ({FAILED}, {CANCELLED})
                RETURNING {COLUMNS}""",
                (now, task_id),
            ).fetchone()
            return row if row is not None else _state_of(conn, task_id)

        found = self._run(work)
        if isinstance(found, TaskState):
            raise FailedPrecondition(
                f"task {task_id} is {found.name}: only FAILED or CANCELLED tasks can be retried"
            )
        return task_from_row(found)

    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        if not refs:
            return 0
        params = {**ref_arrays(refs), "now": now}
        return self._run(
            lambda conn: (
                conn.execute(
                    f"""UPDATE tasks t SET state = {PENDING}, ready = true, ready_at = %(now)s,
                attempts = t.attempts - 1 FROM {REFS} WHERE {FENCE}""",
                    params,
                ).rowcount
            )
        )

    def cancel(self, task_id: str, now: float) -> list[Task]:
        params = {"now": now, "expiry": default_expiry(self.policy, now), "id": task_id}

        def work(conn: psycopg.Connection[Any]) -> list[Task] | TaskState:
            row = conn.execute(
                f"""UPDATE tasks t SET state = {CANCELLED}, finished_at = %(now)s,
                expires_at = {EXPIRES} WHERE id = %(id)s AND state IN ({PENDING}, {RUNNING})
                RETURNING {COLUMNS}""",
                params,
            ).fetchone()
            if row is None:
                return _state_of(conn, task_id)
            task = task_from_row(row)
            return [task, *self._settle(conn, [task], now)]

        found = self._run(work, atomic=True)
        if isinstance(found, TaskState):
            raise FailedPrecondition(f"task {task_id} is already {found.name}")
        return found

    def expire(self, now: float) -> list[Task]:
        def work(conn: psycopg.Connection[Any]) -> list[Task]:
            lapsed = conn.execute(
                f"""SELECT seq, worker_id, lost_leases, lost_by FROM tasks
                WHERE state = {RUNNING} AND lease_deadline <= %s
                ORDER BY lease_deadline, seq FOR UPDATE SKIP LOCKED""",
                (now,),
            ).fetchall()
            if not lapsed:
                return []
            params: dict[str, Any] = {
                "seqs": [],
                "lost_by": [],
                "error_types": [],
                "messages": [],
                "now": now,
                "expiry": default_expiry(self.policy, now),
            }
            for seq, worker_id, lost_leases, lost_by_json in lapsed:
                lost_by = lost_by_after(lost_by_json, worker_id)
                error = (
                    worker_lost_error(lost_by)
                    if lost_leases + 1 > self.policy.max_lost_leases
                    else None
                )
                params["seqs"].append(seq)
                params["lost_by"].append(json.dumps(lost_by))
                params["error_types"].append(error.type if error else None)
                params["messages"].append(error.message if error else None)
            rows = conn.execute(EXPIRE, params).fetchall()
            rows.sort(key=lambda row: row[0])
            lapsed_tasks = [task_from_row(row[1:]) for row in rows]
            return lapsed_tasks + self._settle(conn, lapsed_tasks, now)

        return self._run(work, atomic=True)

    def prune(self, now: float, limit: int) -> int:
        return self._run(
            lambda conn: (
                conn.execute(
                    """DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks
                WHERE expires_at > 0 AND expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED)""",
                    (now, limit),
                ).rowcount
            )
        )

    def purge(self, query: TaskQuery, limit: int) -> int:
        states = query.states or FINAL_STATES
        if not states <= FINAL_STATES:
            raise InvalidArgument("states: only finished tasks can be purged")
        where, params = where_clause(query, states, None, "%s")
        return self._run(
            lambda conn: (
                conn.execute(
                    f"""DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE {where}
                LIMIT %s FOR UPDATE SKIP LOCKED)""",
                    (*params, limit),
                ).rowcount
            )
        )

    def list_tasks(self, query: TaskQuery, limit: int, cursor: int | None = None) -> TaskPage:
        where, params = where_clause(query, query.states, cursor, "%s")
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT seq, {COLUMNS} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT %s",
                (*params, limit + 1),
            ).fetchall()
        )
        return page(rows, limit)

    def next_ready_at(self, now: float) -> float | None:
        row = self._run(
            lambda conn: conn.execute(
                f"SELECT min(ready_at) FROM tasks WHERE {DELAYED} AND ready_at > %s", (now,)
            ).fetchone()
        )
        # Tasks waiting for parents are delayed for ever (deps.WAITING_AT).
        return None if row is None or row[0] is None or math.isinf(row[0]) else row[0]

    def stats(self) -> list[QueueCounts]:
        rows = self._run(
            lambda conn: conn.execute(
                'SELECT queue, state, n FROM counts ORDER BY queue COLLATE "C"'
            ).fetchall()
        )
        return queue_counts(rows)

    def oldest_pending(self, now: float) -> dict[str, float]:
        rows = self._run(lambda conn: conn.execute(OLDEST_PENDING).fetchall())
        return oldest_ready(rows, now)

    def pending_names(self, limit: int) -> list[PendingName]:
        rows = self._run(
            lambda conn: conn.execute(PENDING_NAMES.replace("?", "%s"), (limit,)).fetchall()
        )
        return [PendingName(*row) for row in rows]

    def bus(self) -> PostgresBus:
        return PostgresBus(self._run, self._dsn)

    def close(self) -> None:
        self._pool.close()


def _state_of(conn: psycopg.Connection[Any], task_id: str) -> TaskState:
    """The state of a task an update did not match; raises NotFound if there is none."""
    row = conn.execute("SELECT state FROM tasks WHERE id = %s", (task_id,)).fetchone()
    if row is None:
        raise not_found(task_id)
    return TaskState(row[0])
