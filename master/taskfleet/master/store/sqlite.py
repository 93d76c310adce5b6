"""The durable store: one SQLite file in WAL mode, fsynced on every commit.

Every mutating method is one ``BEGIN IMMEDIATE`` transaction, so an
acknowledged call is on disk and survives a ``kill -9`` of the master, and a
batch is applied whole or not at all. Partial indexes hold only the rows a hot
query needs (ready tasks, delayed tasks, running leases), so leasing stays
O(log n) with millions of finished or queued tasks in the file.

Space: pruned rows' pages go to SQLite's free list and are reused by the next
inserts, so under a steady load with a result TTL the file stops growing; the
WAL is cut back to ``_WAL_LIMIT_BYTES`` after each checkpoint.

A damaged file is looked for at open (see ``_check``) and noticed on any call
that reads a damaged page: from then on every call raises ``StoreUnusable``
naming the file and what to do, without touching the file again, since
writing to a damaged b-tree can spread the damage.
"""

from __future__ import annotations

import dataclasses
import fcntl
import heapq
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

from taskfleet.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    StoreUnusable,
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

log = logging.getLogger("taskfleet.master.store")

_WAL_LIMIT_BYTES = 64 * 1024 * 1024

# PRAGMA quick_check reads every page: measured on a 1 GB file, 1.8-2.1 s with
# the file in the OS cache and 27 s from disk, too long for every start. Up to
# this size the whole file is checked at open (under 0.2 s from the cache, about
# 1.5 s from disk); a larger one gets _CHEAP_CHECKS, and the full check is the
# operator's to run (README: 'A damaged store file').
# (PRAGMA quick_check(N) is no cheaper: N caps the findings, not the pages read.)
FULL_CHECK_MAX_BYTES = 64 * 1024 * 1024

# Result codes (primary, the low byte) that mean the file cannot be trusted.
_DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR}


# A PENDING task is either ready (ready = 1) or delayed until ready_at (ready = 0),
# so the ready index never holds tasks that must be skipped over.
_READY = f"state = {PENDING} AND ready = 1"
_DELAYED = f"state = {PENDING} AND ready = 0"

_SCHEMA = (
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        payload BLOB NOT NULL,
        content_type TEXT NOT NULL,
        priority INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        not_before REAL NOT NULL,
        idempotency_key TEXT NOT NULL,
        metadata TEXT NOT NULL,
        state INTEGER NOT NULL,
        ready INTEGER NOT NULL,
        ready_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease INTEGER NOT NULL DEFAULT 0,
        worker_id TEXT NOT NULL DEFAULT '',
        lease_deadline REAL NOT NULL DEFAULT 0,
        result BLOB NOT NULL DEFAULT x'',
        result_content_type TEXT NOT NULL DEFAULT '',
        error_type TEXT,
        error_message TEXT,
        error_traceback TEXT,
        created_at REAL NOT NULL,
        started_at REAL NOT NULL DEFAULT 0,
        finished_at REAL NOT NULL DEFAULT 0
    )
    """,
    f"CREATE INDEX tasks_ready_by_name ON tasks (queue, name, priority DESC, seq) WHERE {_READY}",
    f"CREATE INDEX tasks_ready_by_queue ON tasks (queue, priority DESC, seq) WHERE {_READY}",
    f"CREATE INDEX tasks_delayed ON tasks (ready_at) WHERE {_DELAYED}",
    f"CREATE INDEX tasks_running ON tasks (lease_deadline) WHERE state = {RUNNING}",
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key != ''",
    # Counts kept by triggers in the same transaction as the rows, so stats()
    # costs O(queues) and can never drift from the tasks, even across a crash.
    """
    CREATE TABLE counts (
        queue TEXT NOT NULL,
        state INTEGER NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (queue, state)
    ) WITHOUT ROWID
    """,
    """
    CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks BEGIN
        INSERT INTO counts (queue, state, n) VALUES (new.queue, new.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
    END
    """,
    """
    CREATE TRIGGER tasks_count_update AFTER UPDATE OF state ON tasks
    WHEN old.state != new.state BEGIN
        UPDATE counts SET n = n - 1 WHERE queue = old.queue AND state = old.state;
        INSERT INTO counts (queue, state, n) VALUES (new.queue, new.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
    END
    """,
)

# Each schema version's statements, applied in order inside one transaction;
# PRAGMA user_version records the last one applied.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _SCHEMA,
    2: (
        "ALTER TABLE tasks ADD COLUMN result_ttl_s REAL NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN lost_by TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE tasks ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN expires_at REAL NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_expiring ON tasks (expires_at) WHERE expires_at > 0",
        """
        CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks BEGIN
            UPDATE counts SET n = n - 1 WHERE queue = old.queue AND state = old.state;
            -- A queue whose last task is gone leaves stats, so names come and go freely.
            DELETE FROM counts WHERE queue = old.queue
                AND (SELECT sum(n) FROM counts WHERE queue = old.queue) = 0;
        END
        """,
    ),
    # TaskSpec.expires_at: the time a task must start by (0: none).
    3: ("ALTER TABLE tasks ADD COLUMN start_by REAL NOT NULL DEFAULT 0",),
    # Dependencies (store/deps.py): a waiting task is delayed until ready_at = Inf.
    4: (
        "ALTER TABLE tasks ADD COLUMN depends_on TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE tasks ADD COLUMN pass_results INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE task_deps (parent TEXT NOT NULL, child TEXT NOT NULL)",
        "CREATE INDEX task_deps_parent ON task_deps (parent)",
    ),
    5: (
        # A schedule's spec is JSON (rows.schedule_row): it is read once per tick.
        """
        CREATE TABLE schedules (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            spec TEXT NOT NULL,
            cron TEXT NOT NULL,
            interval_s REAL NOT NULL,
            timezone TEXT NOT NULL,
            paused INTEGER NOT NULL,
            missed INTEGER NOT NULL,
            next_fire REAL NOT NULL,
            last_fire REAL NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX schedules_due ON schedules (next_fire) WHERE NOT paused",
    ),
}
_SCHEMA_VERSION = max(_MIGRATIONS)
_DEPS = SqlDeps("?", "")

_INSERT = """INSERT INTO tasks (id, name, queue, payload, content_type, priority, max_attempts,
    timeout_s, not_before, idempotency_key, metadata, result_ttl_s, state, ready, ready_at,
    created_at, start_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

# A finished task's deletion time: its own TTL, else the policy's (passed in as
# the second parameter, already added to now; 0 for never).
_EXPIRES = "expires_at = CASE WHEN result_ttl_s > 0 THEN ? + result_ttl_s ELSE ? END"

_INSERT_SCHEDULE = (
    f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?"

# INDEXED BY makes a plan that cannot use the intended index an error, not a table scan.
_CANDIDATES_BY_NAME = f"""SELECT -priority, seq FROM tasks INDEXED BY tasks_ready_by_name
    WHERE {_READY} AND queue = ? AND name = ? ORDER BY priority DESC, seq LIMIT ?"""
_CANDIDATES_BY_QUEUE = f"""SELECT -priority, seq FROM tasks INDEXED BY tasks_ready_by_queue
    WHERE {_READY} AND queue = ? ORDER BY priority DESC, seq LIMIT ?"""

# The WHERE clause that fences an outcome or a release: the lease must be current.
_FENCE = f"id = ? AND state = {RUNNING} AND lease = ?"

# What the master reads first, checked for a large file: the schema, the counts,
# and every page of the indexes of queued, delayed and running tasks. It grows
# with the tasks queued, not with the file: 30 ms from disk for a 1 GB file
# holding 20,000 queued tasks.
_CHEAP_CHECKS = (
    "PRAGMA quick_check(counts)",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_ready_by_name WHERE {_READY}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_ready_by_queue WHERE {_READY}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_delayed WHERE {_DELAYED}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_running WHERE state = {RUNNING}",
)


class SqliteStore(Store):
    """Durable store in the SQLite file at ``path``, created on first use."""

    def __init__(self, path: str, policy: StorePolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._path = path
        self._lock = threading.Lock()
        self._unusable = ""  # why the store is unusable, once it is
        self._owner = _claim(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except BaseException:
            os.close(self._owner)
            raise
        try:
            # Outside _read: a file that is not a database at all is more likely a
            # wrong --store than damage, and open_store says so.
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
            self._migrate(path)
            self._check()
        except BaseException:
            self._db.close()
            os.close(self._owner)
            raise

    def _check(self) -> None:
        """Raise StoreUnusable if the file is damaged: the whole file when it is
        small enough (see FULL_CHECK_MAX_BYTES), else what the master reads first."""
        size_bytes = sum(
            os.path.getsize(p) for p in (self._path, f"{self._path}-wal") if os.path.exists(p)
        )
        full = size_bytes <= FULL_CHECK_MAX_BYTES
        with self._read() as db:
            for statement in ("PRAGMA quick_check",) if full else _CHEAP_CHECKS:
                rows = db.execute(statement).fetchall()
                if statement.startswith("PRAGMA") and rows != [("ok",)]:
                    raise self._give_up(_first_problem(rows))

    def _migrate(self, path: str) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ConfigError(
                    f"{path} has taskfleet schema version {version}; "
                    f"this taskfleet reads versions up to {_SCHEMA_VERSION}"
                )
            for number in range(version + 1, _SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so it never fails half way on a lock."""
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite ends it itself after some errors
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; an error that shows the file damaged
        makes this store unusable for good."""
        with self._lock:
            if self._unusable:  # a new error each time: one raised again grows its traceback
                raise StoreUnusable(self._unusable)
            try:
                yield self._db
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _DAMAGE_CODES:
                    raise
                raise self._give_up(str(exc)) from None

    def _give_up(self, problem: str) -> StoreUnusable:
        """Mark the store unusable (logged and reported once) and return the error."""
        if not self._unusable:
            path = self._path
            self._unusable = (
                f"store file {path} is damaged or unreadable ({problem}); stop the master, "
                f"then restore {path} from a backup, or salvage what it holds with "
                f"sqlite3 {path} .recover | sqlite3 NEW.db (README: 'A damaged store file')"
            )
            if self.on_unusable is not None:  # set once the master serves
                log.error("%s", self._unusable)
                self.on_unusable()
        return StoreUnusable(self._unusable)

    def submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        ids: list[str] = []
        new: list[bool] = []
        rows = []
        with self._write() as db:
            seen: dict[str, str] = {}  # keys earlier in this batch, not yet inserted
            for spec in specs:
                key = spec.idempotency_key
                known = (seen.get(key) or _known_id(db, key)) if key else None
                new.append(known is None)
                if known is not None:
                    ids.append(known)
                    continue
                task_id = new_task_id()
                if key:
                    seen[key] = task_id
                rows.append(_task_row(task_id, spec, now))
                ids.append(task_id)
            db.executemany(_INSERT, rows)
            if any(spec.depends_on for spec in specs):
                _DEPS.add(db, specs, ids, new, now)
        return ids

    def get(self, task_id: str) -> Task:
        with self._read() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,))
            return in_order(rows.fetchall(), [task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[Task]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(task_ids)),),
            ).fetchall()
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
        if limit <= 0:
            return []
        # dict.fromkeys drops repeats, which would offer one task twice.
        queue_list = list(dict.fromkeys(queues))
        queries: list[tuple[str, tuple[str | int, ...]]]
        if names is None:
            queries = [(_CANDIDATES_BY_QUEUE, (q, limit)) for q in queue_list]
        else:
            name_list = list(dict.fromkeys(names))
            queries = [(_CANDIDATES_BY_NAME, (q, n, limit)) for q in queue_list for n in name_list]
        deadline = now + lease_s
        with self._write() as db:
            db.execute(f"UPDATE tasks SET ready = 1 WHERE {_DELAYED} AND ready_at <= ?", (now,))
            # Each query yields its best `limit` in (-priority, seq) order; merging
            # the sorted lists gives the best `limit` over all of them.
            candidates = [db.execute(sql, args).fetchall() for sql, args in queries]
            chosen = [seq for _, seq in islice(heapq.merge(*candidates), limit)]
            rows = db.execute(
                f"""UPDATE tasks SET state = {RUNNING}, attempts = attempts + 1,
                    lease = lease + 1, worker_id = ?, started_at = ?, lease_deadline = ?
                WHERE seq IN (SELECT value FROM json_each(?)) RETURNING seq, {COLUMNS}""",
                (worker_id, now, deadline, json.dumps(chosen)),
            ).fetchall()
        order = {seq: i for i, seq in enumerate(chosen)}
        rows.sort(key=lambda row: order[row[0]])  # RETURNING comes in no set order
        return [Lease(task_from_row(row[1:]), deadline) for row in rows]

    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        stale = []
        with self._write() as db:
            for ref in refs:
                renewed = db.execute(
                    f"UPDATE tasks SET lease_deadline = ? WHERE {_FENCE} AND worker_id = ?",
                    (now + lease_s, ref.task_id, ref.lease, worker_id),
                )
                if renewed.rowcount == 0:
                    stale.append(ref)
        return stale

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        changed = []
        expiry = (now, default_expiry(self.policy, now))
        with self._write() as db:
            for outcome in outcomes:
                fence = (outcome.ref.task_id, outcome.ref.lease)
                delay_s = None
                if outcome.state is TaskState.FAILED:
                    # Whether it runs again depends on what the task has used up.
                    counts = db.execute(
                        f"SELECT attempts, attempt_base, lost_leases FROM tasks WHERE {_FENCE}",
                        fence,
                    ).fetchone()
                    if counts is None:
                        continue  # stale
                    delay_s = retry_delay_s(self.policy, outcome, attempts_used(*counts))
                changes, params = _outcome_update(outcome, now, expiry, delay_s)
                row = db.execute(
                    f"UPDATE tasks SET {changes} WHERE {_FENCE} RETURNING {COLUMNS}",
                    (*params, *fence),
                ).fetchone()
                if row is not None:
                    changed.append(task_from_row(row))
            changed += self._settle(db, changed, now)
        return changed

    def _settle(self, db: sqlite3.Connection, changed: list[Task], now: float) -> list[Task]:
        """The dependents of the tasks that just ended, readied or cancelled."""
        ended = [(t.id, t.state) for t in changed if t.state.is_final]
        expiry = default_expiry(self.policy, now)
        return _DEPS.settle(db, ended, now, expiry, COLUMNS, task_from_row) if ended else []

    def retry(self, task_id: str, now: float) -> Task:
        with self._write() as db:
            row = db.execute(
                f"""UPDATE tasks SET state = {PENDING}, ready = 1, ready_at = ?,
                attempt_base = attempts, lost_leases = 0, lost_by = '[]', finished_at = 0,
                expires_at = 0 WHERE id = ? AND state IN ({FAILED}, {CANCELLED})
                RETURNING {COLUMNS}""",
                (now, task_id),
            ).fetchone()
            if row is None:
                state = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if state is None:
                    raise not_found(task_id)
                raise FailedPrecondition(
                    f"task {task_id} is {TaskState(state[0]).name}: only FAILED or CANCELLED "
                    "tasks can be retried"
                )
        return task_from_row(row)

    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        with self._write() as db:
            released = db.executemany(
                f"""UPDATE tasks SET state = {PENDING}, ready = 1, ready_at = ?,
                    attempts = attempts - 1 WHERE {_FENCE}""",
                [(now, ref.task_id, ref.lease) for ref in refs],
            )
            return released.rowcount

    def cancel(self, task_id: str, now: float) -> list[Task]:
        with self._write() as db:
            row = db.execute(
                f"""UPDATE tasks SET state = {CANCELLED}, finished_at = ?, {_EXPIRES}
                WHERE id = ? AND state IN ({PENDING}, {RUNNING}) RETURNING {COLUMNS}""",
                (now, now, default_expiry(self.policy, now), task_id),
            ).fetchone()
            if row is None:
                state = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if state is None:
                    raise not_found(task_id)
                raise FailedPrecondition(f"task {task_id} is already {TaskState(state[0]).name}")
            task = task_from_row(row)
            return [task, *self._settle(db, [task], now)]

    def expire(self, now: float) -> list[Task]:
        expired = []
        with self._write() as db:
            lapsed = db.execute(
                f"""SELECT seq, worker_id, lost_leases, lost_by FROM tasks
                WHERE state = {RUNNING} AND lease_deadline <= ? ORDER BY lease_deadline, seq""",
                (now,),
            ).fetchall()
            for seq, worker_id, lost_leases, lost_by_json in lapsed:
                lost_by = lost_by_after(lost_by_json, worker_id)
                changes = "lost_leases = lost_leases + 1, lost_by = ?"
                params: tuple[Any, ...] = (json.dumps(lost_by),)
                if lost_leases + 1 > self.policy.max_lost_leases:
                    error = worker_lost_error(lost_by)
                    changes += f""", state = {FAILED}, error_type = ?, error_message = ?,
                        error_traceback = '', finished_at = ?, {_EXPIRES}"""
                    params += (
                        error.type,
                        error.message,
                        now,
                        now,
                        default_expiry(self.policy, now),
                    )
                else:
                    changes += f", state = {PENDING}, ready = 1, ready_at = ?"
                    params += (now,)
                row = db.execute(
                    f"UPDATE tasks SET {changes} WHERE seq = ? RETURNING {COLUMNS}",
                    (*params, seq),
                ).fetchone()
                expired.append(task_from_row(row))
            expired += self._settle(db, expired, now)
        return expired

    def prune(self, now: float, limit: int) -> int:
        with self._write() as db:
            return db.execute(
                """DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_expiring
                WHERE expires_at > 0 AND expires_at <= ? LIMIT ?)""",
                (now, limit),
            ).rowcount

    def purge(self, query: TaskQuery, limit: int) -> int:
        states = query.states or FINAL_STATES
        if not states <= FINAL_STATES:
            raise InvalidArgument("states: only finished tasks can be purged")
        where, params = where_clause(query, states, None, "?")
        with self._write() as db:
            return db.execute(
                f"DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE {where} LIMIT ?)",
                (*params, limit),
            ).rowcount

    def list_tasks(self, query: TaskQuery, limit: int, cursor: int | None = None) -> TaskPage:
        where, params = where_clause(query, query.states, cursor, "?")
        with self._read() as db:
            rows = db.execute(
                f"SELECT seq, {COLUMNS} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        return page(rows, limit)

    def next_ready_at(self, now: float) -> float | None:
        # Read-only: due delayed tasks are promoted by the next lease(), and
        # skipping them here needs no write transaction (and no fsync).
        with self._read() as db:
            row = db.execute(
                f"SELECT min(ready_at) FROM tasks WHERE {_DELAYED} AND ready_at > ?", (now,)
            ).fetchone()
        # Tasks waiting for parents are delayed for ever (deps.WAITING_AT).
        ready_at: float | None = row[0]
        return None if ready_at is None or math.isinf(ready_at) else ready_at

    def stats(self) -> list[QueueCounts]:
        with self._read() as db:
            rows = db.execute("SELECT queue, state, n FROM counts ORDER BY queue").fetchall()
        return queue_counts(rows)

    def pending_names(self, limit: int) -> list[PendingName]:
        with self._read() as db:
            rows = db.execute(PENDING_NAMES, (limit,)).fetchall()
        return [PendingName(*row) for row in rows]

    # -- schedules ---------------------------------------------------------------

    def add_schedule(self, schedule: Schedule) -> Schedule:
        schedule = dataclasses.replace(schedule, id=new_task_id())
        with self._write() as db:
            db.execute(_INSERT_SCHEDULE, schedule_row(schedule))
        return schedule

    def get_schedule(self, schedule_id: str) -> Schedule:
        with self._read() as db:
            row = db.execute(_SELECT_SCHEDULE, (schedule_id,)).fetchone()
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def list_schedules(self) -> list[Schedule]:
        with self._read() as db:
            rows = db.execute(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY seq").fetchall()
        return [schedule_from_row(row) for row in rows]

    def delete_schedule(self, schedule_id: str) -> None:
        with self._write() as db:
            if not db.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,)).rowcount:
                raise schedule_not_found(schedule_id)

    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        with self._write() as db:
            db.execute(
                "UPDATE schedules SET paused = ?, next_fire = ? WHERE id = ?",
                (paused, next_fire, schedule_id),
            )
            row = db.execute(_SELECT_SCHEDULE, (schedule_id,)).fetchone()
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire <= ?"
                " ORDER BY next_fire LIMIT ?",
                (now, limit),
            ).fetchall()
        return [schedule_from_row(row) for row in rows]

    def next_schedule_fire(self) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT min(next_fire) FROM schedules WHERE NOT paused").fetchone()
        return None if row[0] is None else float(row[0])

    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        tick = None if fired is None else fired.tick
        with self._write() as db:
            claimed = db.execute(
                "UPDATE schedules SET next_fire = ?, last_fire = coalesce(?, last_fire)"
                " WHERE id = ? AND next_fire = ? AND NOT paused",
                (next_fire, tick, schedule_id, due),
            ).rowcount
            if not claimed or fired is None:
                return None
            task_id = new_task_id()
            db.execute(_INSERT, _task_row(task_id, fired.spec, now))
            return task_id

    def close(self) -> None:
        with self._lock:  # even when unusable
            self._db.close()
            os.close(self._owner)  # and with it the claim on the file


def _claim(path: str) -> int:
    """Take the file for this store alone, or raise ConfigError: a second master on
    one SQLite file would hand out every task twice. The claim is an flock on a
    ``PATH.lock`` beside it (not on the database itself: closing any descriptor of
    the database would drop SQLite's own POSIX locks), held until ``close`` and
    released by the kernel when the process dies, even by ``kill -9``."""
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{path} is in use by another master (it holds {lock_path}); a SQLite store "
            "serves one master: stop the other, or give this one a file of its own"
        ) from None
    return fd


def _first_problem(rows: Sequence[tuple[str]]) -> str:
    """What quick_check reported, on one line: its first finding and how many more."""
    lines = [line for row in rows for line in str(row[0]).splitlines()]
    found = [line for line in lines if not line.startswith("***")]  # "*** in database main ***"
    first = found[0] if found else "no details"
    more = f", and {len(found) - 1} more findings" if len(found) > 1 else ""
    return f"quick_check: {first}{more}"


def _task_row(task_id: str, spec: TaskSpec, now: float) -> tuple[Any, ...]:
    """The values of ``_INSERT`` for a new task."""
    ready_at = max(spec.not_before, now)
    return (
        task_id,
        *spec_values(spec),
        PENDING,
        int(ready_at <= now),
        ready_at,
        now,
        spec.expires_at,
    )


def _known_id(db: sqlite3.Connection, key: str) -> str | None:
    # The literal `!= ''` term lets SQLite use the partial unique index.
    row = db.execute(
        "SELECT id FROM tasks WHERE idempotency_key = ? AND idempotency_key != ''", (key,)
    ).fetchone()
    return None if row is None else str(row[0])


def _outcome_update(
    outcome: Outcome, now: float, expiry: tuple[float, float], delay_s: float | None
) -> tuple[str, tuple[Any, ...]]:
    """The SET clause and its parameters that apply ``outcome`` to its task's row;
    ``expiry`` holds the parameters of ``_EXPIRES``; a FAILED outcome runs again
    after ``delay_s`` unless it is None."""
    if outcome.state is TaskState.SUCCEEDED:
        return (
            f"""state = {SUCCEEDED}, result = ?, result_content_type = ?, error_type = NULL,
            error_message = NULL, error_traceback = NULL, finished_at = ?, {_EXPIRES}""",
            (outcome.result, outcome.result_content_type, now, *expiry),
        )
    if outcome.state is TaskState.CANCELLED:
        error = outcome.error
        if error is None:
            return f"state = {CANCELLED}, finished_at = ?, {_EXPIRES}", (now, *expiry)
        return (  # with why, as when it expired unstarted
            f"""state = {CANCELLED}, error_type = ?, error_message = ?, error_traceback = ?,
            finished_at = ?, {_EXPIRES}""",
            (error.type, error.message, error.traceback, now, *expiry),
        )
    if outcome.state is not TaskState.FAILED:
        # Raised inside the transaction, so the whole batch rolls back.
        raise InvalidArgument(
            f"outcome state of task {outcome.ref.task_id} must be SUCCEEDED, FAILED "
            f"or CANCELLED, not {outcome.state.name}"
        )
    error = outcome.error
    error_params = (
        (None, None, None) if error is None else (error.type, error.message, error.traceback)
    )
    error_set = "error_type = ?, error_message = ?, error_traceback = ?"
    if delay_s is None:
        return (
            f"state = {FAILED}, {error_set}, finished_at = ?, {_EXPIRES}",
            (*error_params, now, *expiry),
        )
    ready_at = now + delay_s
    return (
        f"state = {PENDING}, ready = ?, ready_at = ?, {error_set}",
        (int(ready_at <= now), ready_at, *error_params),
    )
