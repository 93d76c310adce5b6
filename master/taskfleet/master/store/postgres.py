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
Not waiting for the flush lets a lease give up its locks (the counts rows that
every writer updates among them) a flush sooner.

The schema is versioned: migrations run at open inside one transaction that
holds an advisory lock, so masters started together apply them once.

Any number of masters can share one database: every statement is correct
against the others' (claims skip locked rows, updates are fenced), and
housekeeping (``expire``, ``prune``) skips rows another master holds, so all
masters run it at once and each lapsed lease is returned once. What the
masters tell each other (wake-ups, results, revocations) goes over the bus
(postgres_bus.py).

When the server goes away (stopped, restarted, unreachable), a call fails
with ``StoreUnavailable`` within ``_POOL_TIMEOUT_S``, and from then on at once,
without waiting on a pool whose connections all died with the server: the
master's watch calls ``ping`` until the database answers, and that first
answer brings a fresh pool. No connection is checked when it is taken from
the pool: psycopg_pool's check costs a round trip per call (a one-row get
took 193 us instead of 123 us, best of 20 runs on this machine). A dead one
fails the call it serves instead, and that failure is what starts the watch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from taskfleet.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    StoreUnavailable,
)
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    Outcome,
    PendingName,
    QueueCounts,
    Schedule,
    Task,
    TaskSpec,
    TaskState,
)
from taskfleet.common.store_urls import redacted
from taskfleet.master.store import postgres_bus
from taskfleet.master.store.base import (
    DEFAULT_POLICY,
    FINAL_STATES,
    FiredTick,
    Store,
    StorePolicy,
    TaskPage,
    TaskQuery,
    attempts_used,
    new_task_id,
    not_found,
    retry_delay_s,
    schedule_not_found,
    worker_lost_error,
)
from taskfleet.master.store.deps import SqlDeps
from taskfleet.master.store.postgres_bus import PostgresBus
from taskfleet.master.store.rows import (
    CANCELLED,
    COLUMNS,
    FAILED,
    PENDING,
    PENDING_NAMES,
    RUNNING,
    SCHEDULE_COLUMNS,
    SUCCEEDED,
    default_expiry,
    in_order,
    lost_by_after,
    page,
    queue_counts,
    schedule_from_row,
    schedule_row,
    spec_values,
    task_from_row,
    where_clause,
)

_READY = f"state = {PENDING} AND ready"
_DELAYED = f"state = {PENDING} AND NOT ready"
# Taken by every master while it migrates: any constant no other user of the
# database picks ("taskflee" in ASCII).
_MIGRATION_LOCK = 0x7461736B666C6565
# Transactions that lost a race (a deadlock on the counts, an idempotency key
# inserted at the same time) run again; more than this many losses is a bug.
_RACE_RETRIES = 5
_POOL_MAX_SIZE = 4
_PREPARE_THRESHOLD = 5
_CONNECT_TIMEOUT_S = 10
# How long a call waits for a pooled connection: psycopg_pool's 30 s would hold
# every caller (and the master's store threads) that long when the server dies.
_POOL_TIMEOUT_S = 5.0
# A ping while the database is away: a server that is down refuses at once, a
# host that is cut off must not hold the watch for long.
_PING_CONNECT_TIMEOUT_S = 3

_COUNT_FUNCTION = """
CREATE FUNCTION taskfleet_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One upsert per (queue, state) a statement changed, in a fixed order so
    -- concurrent transactions lock the counts rows alike and cannot deadlock.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO counts (queue, state, n)
        SELECT queue, state, count(*) FROM new_rows GROUP BY queue, state ORDER BY queue, state
        ON CONFLICT (queue, state) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO counts (queue, state, n)
        SELECT queue, state, sum(d) FROM (
            SELECT queue, state, 1 AS d FROM new_rows
            UNION ALL SELECT queue, state, -1 FROM old_rows
        ) changes GROUP BY queue, state HAVING sum(d) <> 0 ORDER BY queue, state
        ON CONFLICT (queue, state) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        INSERT INTO counts (queue, state, n)
        SELECT queue, state, -count(*) FROM old_rows GROUP BY queue, state ORDER BY queue, state
        ON CONFLICT (queue, state) DO UPDATE SET n = counts.n + excluded.n;
        -- A queue whose last task is gone leaves stats, so names come and go freely.
        DELETE FROM counts WHERE queue IN (
            SELECT c.queue FROM counts c WHERE c.queue IN (SELECT queue FROM old_rows)
            GROUP BY c.queue HAVING sum(c.n) = 0);
    END IF;
    RETURN NULL;
END $$
"""

# Each schema version's statements, applied in order inside one transaction;
# taskfleet_schema records the last one applied.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE tasks (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            name text NOT NULL,
            queue text NOT NULL,
            payload bytea NOT NULL,
            content_type text NOT NULL,
            priority integer NOT NULL,
            max_attempts integer NOT NULL,
            timeout_s double precision NOT NULL,
            not_before double precision NOT NULL,
            idempotency_key text NOT NULL,
            metadata text NOT NULL,
            result_ttl_s double precision NOT NULL,
            state smallint NOT NULL,
            ready boolean NOT NULL,
            ready_at double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            lease integer NOT NULL DEFAULT 0,
            worker_id text NOT NULL DEFAULT '',
            lease_deadline double precision NOT NULL DEFAULT 0,
            result bytea NOT NULL DEFAULT '',
            result_content_type text NOT NULL DEFAULT '',
            error_type text,
            error_message text,
            error_traceback text,
            created_at double precision NOT NULL,
            started_at double precision NOT NULL DEFAULT 0,
            finished_at double precision NOT NULL DEFAULT 0,
            lost_leases integer NOT NULL DEFAULT 0,
            lost_by text NOT NULL DEFAULT '[]',
            attempt_base integer NOT NULL DEFAULT 0,
            expires_at double precision NOT NULL DEFAULT 0
        )
        """,
        f"CREATE INDEX tasks_ready_by_name ON tasks (queue, name, priority DESC, seq)"
        f" WHERE {_READY}",
        f"CREATE INDEX tasks_ready_by_queue ON tasks (queue, priority DESC, seq) WHERE {_READY}",
        f"CREATE INDEX tasks_delayed ON tasks (ready_at) WHERE {_DELAYED}",
        f"CREATE INDEX tasks_running ON tasks (lease_deadline) WHERE state = {RUNNING}",
        "CREATE INDEX tasks_expiring ON tasks (expires_at) WHERE expires_at > 0",
        "CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key)"
        " WHERE idempotency_key <> ''",
        # Counts kept by statement triggers in the same transaction as the rows,
        # so stats() costs O(queues) and can never drift from the tasks.
        """
        CREATE TABLE counts (
            queue text NOT NULL,
            state smallint NOT NULL,
            n bigint NOT NULL,
            PRIMARY KEY (queue, state)
        )
        """,
        _COUNT_FUNCTION,
        "CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS"
        " new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskfleet_count()",
        "CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS"
        " old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskfleet_count()",
        "CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS"
        " old_rows FOR EACH STATEMENT EXECUTE FUNCTION taskfleet_count()",
    ),
    2: postgres_bus.MIGRATION,
    # TaskSpec.expires_at: the time a task must start by (0: none).
    3: ("ALTER TABLE tasks ADD COLUMN start_by double precision NOT NULL DEFAULT 0",),
    # Dependencies (store/deps.py): a waiting task is delayed until ready_at = Infinity.
    4: (
        "ALTER TABLE tasks ADD COLUMN depends_on text NOT NULL DEFAULT '[]'",
        "ALTER TABLE tasks ADD COLUMN pass_results smallint NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN waiting integer NOT NULL DEFAULT 0",
        "CREATE TABLE task_deps (parent text NOT NULL, child text NOT NULL)",
        "CREATE INDEX task_deps_parent ON task_deps (parent)",
    ),
    5: (
        # A schedule's spec is JSON (rows.schedule_row): it is read once per tick.
        """
        CREATE TABLE schedules (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            spec text NOT NULL,
            cron text NOT NULL,
            interval_s double precision NOT NULL,
            timezone text NOT NULL,
            paused boolean NOT NULL,
            missed smallint NOT NULL,
            next_fire double precision NOT NULL,
            last_fire double precision NOT NULL,
            created_at double precision NOT NULL
        )
        """,
        "CREATE INDEX schedules_due ON schedules (next_fire) WHERE NOT paused",
    ),
}
# FOR SHARE: a parent cannot end between the check of its state and the edge to it.
_DEPS = SqlDeps("%s", " FOR SHARE")
SCHEMA_VERSION = max(_MIGRATIONS)

TCOLUMNS_ = ", ".join(f"t.{c.strip()}" for c in COLUMNS.split(","))

# A finished task's deletion time: its own TTL, else the policy's default
# (the parameter, already added to now; 0 for never).
_EXPIRES = "CASE WHEN t.result_ttl_s > 0 THEN %(now)s + t.result_ttl_s ELSE %(expiry)s END"

_INSERT = """INSERT INTO tasks (id, name, queue, payload, content_type, priority, max_attempts,
    timeout_s, not_before, idempotency_key, metadata, result_ttl_s, state, ready, ready_at,
    created_at, start_by)
    SELECT id, name, queue, payload, content_type, priority, max_attempts, timeout_s,
        not_before, idempotency_key, metadata, result_ttl_s, %s::smallint, ready_at <= %s,
        ready_at, %s::float8, start_by FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::bytea[], %b::text[], %b::int[], %b::int[],
        %b::float8[], %b::float8[], %b::text[], %b::text[], %b::float8[], %b::float8[],
        %b::float8[]
    ) AS s(id, name, queue, payload, content_type, priority, max_attempts, timeout_s,
        not_before, idempotency_key, metadata, result_ttl_s, ready_at, start_by)"""

_INSERT_SCHEDULE = f"""INSERT INTO schedules ({SCHEDULE_COLUMNS})
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
_SELECT_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = %s"

# The best `limit` ready tasks of each queue (and name), from its index, locked
# unless another lease holds them; the outer ORDER BY picks the best overall.
# The claim's commit alone does not wait for the flush (see the docstring);
# a volatile CTE is evaluated once, before any row is claimed.
_CLAIM = f"""WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true)),
    chosen AS (
    SELECT c.seq FROM unflushed, {{sources}}, LATERAL (
        SELECT seq, priority FROM tasks
        WHERE {_READY} AND queue = q.queue {{name_term}}
        ORDER BY {{order}} LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ) c ORDER BY c.priority DESC, c.seq LIMIT %(limit)s)
    UPDATE tasks t SET state = {RUNNING}, attempts = attempts + 1, lease = lease + 1,
        worker_id = %(worker)s, started_at = %(now)s, lease_deadline = %(deadline)s
    FROM chosen WHERE t.seq = chosen.seq RETURNING t.priority, t.seq, {TCOLUMNS_}"""

_CLAIM_BY_QUEUE = _CLAIM.format(
    sources="unnest(%(queues)b::text[]) q(queue)", name_term="", order="priority DESC, seq"
)
# The name as a range, not with `=`: with `=` the planner takes the name for a
# constant, finds tasks_ready_by_queue as well ordered as tasks_ready_by_name,
# and may scan it filtering by name, reading every ready task of the queue for
# each name that has none (33 ms a lease at 20,000 queued, measured). Ordered
# by name too, only tasks_ready_by_name yields the order without a sort.
_CLAIM_BY_NAME = _CLAIM.format(
    sources="unnest(%(queues)b::text[]) q(queue), unnest(%(names)b::text[]) n(name)",
    name_term="AND name >= n.name AND name <= n.name",
    order="name, priority DESC, seq",
)

_REFS = "unnest(%(ids)b::text[], %(leases)b::int[]) AS r(id, lease)"
# The fence of an outcome, a renewal or a release: the lease must be current.
_FENCE = f"t.id = r.id AND t.state = {RUNNING} AND t.lease = r.lease"

# Outcomes as arrays, one element each; a FAILED one with a ready_at runs again.
_RECORD = f"""UPDATE tasks t SET
    state = CASE WHEN r.ready_at IS NOT NULL THEN {PENDING} ELSE r.state END,
    result = CASE WHEN r.state = {SUCCEEDED} THEN r.result ELSE t.result END,
    result_content_type = CASE WHEN r.state = {SUCCEEDED} THEN r.result_content_type
        ELSE t.result_content_type END,
    error_type = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_type
        ELSE t.error_type END,
    error_message = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_message
        ELSE t.error_message END,
    error_traceback = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_traceback
        ELSE t.error_traceback END,
    ready = CASE WHEN r.ready_at IS NOT NULL THEN r.ready_at <= %(now)s ELSE t.ready END,
    ready_at = CASE WHEN r.ready_at IS NOT NULL THEN r.ready_at ELSE t.ready_at END,
    finished_at = CASE WHEN r.ready_at IS NOT NULL THEN t.finished_at ELSE %(now)s END,
    expires_at = CASE WHEN r.ready_at IS NOT NULL THEN t.expires_at ELSE {_EXPIRES} END
    FROM unnest(%(ids)b::text[], %(leases)b::int[], %(states)b::smallint[],
        %(results)b::bytea[], %(types)b::text[], %(error_types)b::text[],
        %(messages)b::text[], %(tracebacks)b::text[], %(ready_ats)b::float8[])
        WITH ORDINALITY AS r(id, lease, state, result, result_content_type, error_type,
            error_message, error_traceback, ready_at, i)
    WHERE {_FENCE} RETURNING r.i, {TCOLUMNS_}"""

_EXPIRE = f"""UPDATE tasks t SET lost_leases = t.lost_leases + 1, lost_by = r.lost_by,
    state = CASE WHEN r.error_type IS NULL THEN {PENDING} ELSE {FAILED} END,
    ready = CASE WHEN r.error_type IS NULL THEN true ELSE t.ready END,
    ready_at = CASE WHEN r.error_type IS NULL THEN %(now)s ELSE t.ready_at END,
    error_type = coalesce(r.error_type, t.error_type),
    error_message = coalesce(r.error_message, t.error_message),
    error_traceback = CASE WHEN r.error_type IS NULL THEN t.error_traceback ELSE '' END,
    finished_at = CASE WHEN r.error_type IS NULL THEN t.finished_at ELSE %(now)s END,
    expires_at = CASE WHEN r.error_type IS NULL THEN t.expires_at ELSE {_EXPIRES} END
    FROM unnest(%(seqs)s::bigint[], %(lost_by)s::text[], %(error_types)s::text[],
        %(messages)s::text[]) WITH ORDINALITY AS r(seq, lost_by, error_type, error_message, i)
    WHERE t.seq = r.seq RETURNING r.i, {TCOLUMNS_}"""

_RACES = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.UniqueViolation)

R = TypeVar("R")


class PostgresStore(Store):
    """Durable store in the PostgreSQL database ``dsn`` names, migrated on open."""

    blocks = True

    def __init__(
        self, dsn: str, policy: StorePolicy = DEFAULT_POLICY, *, prepare: bool = True
    ) -> None:
        self.policy = policy
        self._dsn = dsn
        self._prepare = prepare
        self._where = redacted(dsn)
        try:
            with psycopg.connect(dsn, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
                self._migrate(conn)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot use {self._where}: {_first_line(exc)}") from None
        self._pool = self._new_pool()
        self._lost_lock = threading.Lock()
        self._lost = ""  # why the database is unreachable, while it is

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(
            self._dsn,
            min_size=1,
            max_size=_POOL_MAX_SIZE,
            kwargs={
                "connect_timeout": _CONNECT_TIMEOUT_S,
                "autocommit": True,
                # None: never prepare (a transaction-mode pooler cannot hold them);
                # otherwise psycopg prepares a statement on its fifth run.
                "prepare_threshold": _PREPARE_THRESHOLD if self._prepare else None,
            },
            timeout=_POOL_TIMEOUT_S,
            name="taskfleet-store",
            open=True,
        )

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS taskfleet_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM taskfleet_schema").fetchone()
            version = row[0] if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self._where} has taskfleet schema version {version}; "
                    f"this taskfleet reads versions up to {SCHEMA_VERSION}"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number]:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute("DELETE FROM taskfleet_schema")
                conn.execute("INSERT INTO taskfleet_schema VALUES (%s)", (SCHEMA_VERSION,))

    def _run(self, work: Callable[[psycopg.Connection[Any]], R], atomic: bool = False) -> R:
        """``work`` on a pooled connection, in one transaction if ``atomic``; run
        again when it lost a race to another."""
        for attempt in range(_RACE_RETRIES):
            if self._lost:
                raise StoreUnavailable(self._lost)
            pool = self._pool
            try:
                with pool.connection() as conn:
                    if not atomic:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
            except _RACES:
                if attempt == _RACE_RETRIES - 1:
                    raise
            except psycopg.OperationalError as exc:
                if not _unreachable(exc):
                    raise
                raise self._lose(exc, pool) from None
        raise AssertionError("unreachable")

    def _lose(self, exc: psycopg.OperationalError, pool: ConnectionPool) -> StoreUnavailable:
        """Note that the server is gone: calls fail at once until ``ping`` finds it
        back, and the master hears of it once. A call in flight when the server
        died may have committed or not; its caller learns only that it failed.
        A call that failed on a pool already replaced tells nothing new."""
        with self._lost_lock:
            first = not self._lost and pool is self._pool
            if first:
                self._lost = f"database unreachable: {_first_line(exc)}"
            message = self._lost or f"database unreachable: {_first_line(exc)}"
        if first and self.on_unavailable is not None:
            self.on_unavailable()
        return StoreUnavailable(message)

    def ping(self) -> None:
        if not self._lost:
            try:
                self._run(lambda conn: conn.execute("SELECT 1"))
                return
            except StoreUnavailable:
                pass  # maybe only the pool's connections died, with a server now back
        try:
            with psycopg.connect(
                self._dsn, connect_timeout=_PING_CONNECT_TIMEOUT_S, autocommit=True
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            # The pool's connections died with the server, and its own reconnecting
            # would back off to minutes and log every attempt: closed (once).
            self._pool.close()
            raise StoreUnavailable(f"database unreachable: {_first_line(exc)}") from None
        dead, self._pool = self._pool, self._new_pool()
        with self._lost_lock:
            self._lost = ""
        dead.close()

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
            columns: list[list[Any]] = [[] for _ in range(14)]
            for spec in specs:
                key = spec.idempotency_key
                if key and key in known:
                    ids.append(known[key])
                    continue
                task_id = new_task_id()
                if key:
                    known[key] = task_id
                row = _task_row(task_id, spec, now)
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
                ids.append(task_id)
            inserted = set(columns[0])
            if columns[0]:
                conn.execute(_INSERT, (PENDING, now, now, *columns))
            if with_parents:
                _DEPS.add(conn, specs, ids, [task_id in inserted for task_id in ids], now)
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

    def lease(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str] | None,
        limit: int,
        lease_s: float,
        now: float,
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
            sql = _CLAIM_BY_QUEUE
        else:
            params["names"] = list(dict.fromkeys(names))
            sql = _CLAIM_BY_NAME

        def work(conn: psycopg.Connection[Any]) -> list[Any]:
            conn.execute(
                f"UPDATE tasks SET ready = true WHERE {_DELAYED} AND ready_at <= %s", (now,)
            )
            # Rows in binary: numbers and bytea (the payload) need no parsing.
            return conn.execute(sql, params, binary=True).fetchall()

        rows = self._run(work)
        rows.sort(key=lambda row: (-row[0], row[1]))  # RETURNING comes in no set order
        return [Lease(task_from_row(row[2:]), now + lease_s) for row in rows]

    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        if not refs:
            return []
        params = {**_ref_arrays(refs), "deadline": now + lease_s, "worker": worker_id}
        renewed = self._run(
            lambda conn: conn.execute(
                f"""UPDATE tasks t SET lease_deadline = %(deadline)s FROM {_REFS}
                WHERE {_FENCE} AND t.worker_id = %(worker)s RETURNING t.id, t.lease""",
                params,
            ).fetchall()
        )
        valid = set(renewed)
        return [ref for ref in refs if (ref.task_id, ref.lease) not in valid]

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        for outcome in outcomes:
            if outcome.state not in FINAL_STATES:
                raise InvalidArgument(
                    f"outcome state of task {outcome.ref.task_id} must be SUCCEEDED, FAILED "
                    f"or CANCELLED, not {outcome.state.name}"
                )
        # The first outcome for a lease ends it; a repeat is stale, as if applied after.
        firsts: dict[tuple[str, int], Outcome] = {}
        for outcome in outcomes:
            firsts.setdefault((outcome.ref.task_id, outcome.ref.lease), outcome)
        unique = list(firsts.values())
        if not unique:
            return []
        failed = [o for o in unique if o.state is TaskState.FAILED]

        def work(conn: psycopg.Connection[Any]) -> list[Task]:
            used: dict[tuple[str, int], int] = {}
            if failed:
                rows = conn.execute(
                    f"""SELECT t.id, t.lease, t.attempts, t.attempt_base, t.lost_leases
                    FROM tasks t, {_REFS} WHERE {_FENCE} FOR UPDATE OF t""",
                    _ref_arrays([o.ref for o in failed]),
                ).fetchall()
                used = {(row[0], row[1]): attempts_used(*row[2:]) for row in rows}
            params: dict[str, Any] = {
                **_ref_arrays([o.ref for o in unique]),
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
            rows = conn.execute(_RECORD, params, binary=True).fetchall()
            rows.sort(key=lambda row: row[0])
            changed = [task_from_row(row[1:]) for row in rows]
            return changed + self._settle(conn, changed, now)

        # Atomic: the dependents of the tasks that end are settled in the same transaction.
        return self._run(work, atomic=True)

    def _settle(self, conn: psycopg.Connection[Any], changed: list[Task], now: float) -> list[Task]:
        """The dependents of the tasks that just ended, readied or cancelled."""
        ended = [(t.id, t.state) for t in changed if t.state.is_final]
        expiry = default_expiry(self.policy, now)
        return _DEPS.settle(conn, ended, now, expiry, COLUMNS, task_from_row) if ended else []

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
        params = {**_ref_arrays(refs), "now": now}
        return self._run(
            lambda conn: (
                conn.execute(
                    f"""UPDATE tasks t SET state = {PENDING}, ready = true, ready_at = %(now)s,
                attempts = t.attempts - 1 FROM {_REFS} WHERE {_FENCE}""",
                    params,
                ).rowcount
            )
        )

    def cancel(self, task_id: str, now: float) -> list[Task]:
        params = {"now": now, "expiry": default_expiry(self.policy, now), "id": task_id}

        def work(conn: psycopg.Connection[Any]) -> list[Task] | TaskState:
            row = conn.execute(
                f"""UPDATE tasks t SET state = {CANCELLED}, finished_at = %(now)s,
                expires_at = {_EXPIRES} WHERE id = %(id)s AND state IN ({PENDING}, {RUNNING})
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
            rows = conn.execute(_EXPIRE, params).fetchall()
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
                f"SELECT min(ready_at) FROM tasks WHERE {_DELAYED} AND ready_at > %s", (now,)
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

    def pending_names(self, limit: int) -> list[PendingName]:
        rows = self._run(
            lambda conn: conn.execute(PENDING_NAMES.replace("?", "%s"), (limit,)).fetchall()
        )
        return [PendingName(*row) for row in rows]

    # -- schedules ---------------------------------------------------------------

    def add_schedule(self, schedule: Schedule) -> Schedule:
        schedule = dataclasses.replace(schedule, id=new_task_id())
        row = schedule_row(schedule)
        self._run(lambda conn: conn.execute(_INSERT_SCHEDULE, row))
        return schedule

    def get_schedule(self, schedule_id: str) -> Schedule:
        row = self._run(lambda conn: conn.execute(_SELECT_SCHEDULE, (schedule_id,)).fetchone())
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def list_schedules(self) -> list[Schedule]:
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY seq"
            ).fetchall()
        )
        return [schedule_from_row(row) for row in rows]

    def delete_schedule(self, schedule_id: str) -> None:
        deleted = self._run(
            lambda conn: (
                conn.execute("DELETE FROM schedules WHERE id = %s", (schedule_id,)).rowcount
            )
        )
        if not deleted:
            raise schedule_not_found(schedule_id)

    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        row = self._run(
            lambda conn: conn.execute(
                f"UPDATE schedules SET paused = %s, next_fire = %s WHERE id = %s"
                f" RETURNING {SCHEDULE_COLUMNS}",
                (paused, next_fire, schedule_id),
            ).fetchone()
        )
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire <= %s"
                " ORDER BY next_fire LIMIT %s",
                (now, limit),
            ).fetchall()
        )
        return [schedule_from_row(row) for row in rows]

    def next_schedule_fire(self) -> float | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT min(next_fire) FROM schedules WHERE NOT paused"
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        tick = None if fired is None else fired.tick

        def work(conn: psycopg.Connection[Any]) -> str | None:
            # Of masters racing for one tick, the first UPDATE holds the row until
            # it commits; the others then read the new next_fire and match nothing.
            claimed = conn.execute(
                "UPDATE schedules SET next_fire = %s, last_fire = coalesce(%s, last_fire)"
                " WHERE id = %s AND next_fire = %s AND NOT paused",
                (next_fire, tick, schedule_id, due),
            ).rowcount
            if not claimed or fired is None:
                return None
            task_id = new_task_id()
            columns = [[value] for value in _task_row(task_id, fired.spec, now)]
            conn.execute(_INSERT, (PENDING, now, now, *columns))
            return task_id

        return self._run(work, atomic=True)

    def bus(self) -> PostgresBus:
        return PostgresBus(self._run, self._dsn)

    def close(self) -> None:
        self._pool.close()


def _task_row(task_id: str, spec: TaskSpec, now: float) -> tuple[Any, ...]:
    """One new task's element of each array ``_INSERT`` unnests."""
    return (task_id, *spec_values(spec), max(spec.not_before, now), spec.expires_at)


def _unreachable(exc: psycopg.OperationalError) -> bool:
    """Whether ``exc`` says the server is gone (or cannot be reached) rather than
    refusing one statement: no SQLSTATE (the connection broke, or the pool had
    none to give), a connection exception (08) or an operator intervention such
    as a shutdown (57P)."""
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _ref_arrays(refs: Sequence[LeaseRef]) -> dict[str, list[Any]]:
    return {"ids": [ref.task_id for ref in refs], "leases": [ref.lease for ref in refs]}


def _state_of(conn: psycopg.Connection[Any], task_id: str) -> TaskState:
    """The state of a task an update did not match; raises NotFound if there is none."""
    row = conn.execute("SELECT state FROM tasks WHERE id = %s", (task_id,)).fetchone()
    if row is None:
        raise not_found(task_id)
    return TaskState(row[0])
