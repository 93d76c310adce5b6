"""The durable store: one SQLite file in WAL mode, fsynced on every commit.

Every mutating method is one ``BEGIN IMMEDIATE`` transaction, so an
acknowledged call is on disk and survives a ``kill -9`` of the master, and a
batch is applied whole or not at all: with a fixed number of statements, not
one per task, where a batch of refs or outcomes is fenced (``_held``). Partial
indexes hold only the rows a hot query needs (ready tasks, delayed tasks,
running leases), so leasing stays O(log n) with millions of finished or queued
tasks in the file.

Space: pruned rows' pages go to SQLite's free list and are reused by the next
inserts, so under a steady load with a result TTL the file stops growing; the
WAL is cut back to ``_WAL_LIMIT_BYTES`` after each checkpoint.

A damaged file is looked for at open (sqlite_damage.py) and noticed on any call
that reads a damaged page: from then on every call raises ``StoreUnusable``
naming the file and what to do, without touching the file again, since
writing to a damaged b-tree can spread the damage.

The schema is in sqlite_schema.py, the damage check in sqlite_damage.py,
statements several methods share in sqlite_sql.py, schedules in
sqlite_schedules.py.
"""

from __future__ import annotations

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
from typing import Any, NamedTuple

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
    Progress,
    QueueCounts,
    Task,
    TaskSpec,
    TaskState,
)
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
from taskfleet.master.store.rows import (
    CANCELLED,
    COLUMNS,
    FAILED,
    OLDEST_PENDING,
    PENDING,
    PENDING_NAMES,
    RUNNING,
    SUCCEEDED,
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
from taskfleet.master.store.sqlite_damage import find_damage, is_damage
from taskfleet.master.store.sqlite_schedules import SqliteSchedules
from taskfleet.master.store.sqlite_schema import DELAYED, migrate
from taskfleet.master.store.sqlite_sql import (
    CANDIDATES_BY_NAME,
    CANDIDATES_BY_QUEUE,
    DEPS,
    EXPIRES,
    INSERT,
    Counts,
    known_id,
    outcome_update,
    task_row,
    without_keys,
)

_GET_MANY = f"SELECT {COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
_GET_BY_SEQ = f"SELECT {COLUMNS} FROM tasks WHERE seq IN (SELECT value FROM json_each(?))"
_FINAL_OR_NOT = f"""SELECT id, state >= {SUCCEEDED} FROM tasks
    WHERE id IN (SELECT value FROM json_each(?))"""

log = logging.getLogger("taskfleet.master.store")

_WAL_LIMIT_BYTES = 64 * 1024 * 1024


class SqliteStore(SqliteSchedules, Store):
    """Durable store in the SQLite file at ``path``, created on first use."""

    lock: threading.Lock

    def __init__(self, path: str, policy: StorePolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._path = path
        self.lock = threading.Lock()
        self._unusable = ""  # why the store is unusable, once it is
        self._counts = Counts()  # what the write under way changes; applied by _write
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
        """Raise StoreUnusable if the file is damaged (sqlite_damage.py)."""
        with self._read() as db:
            problem = find_damage(db, self._path)
            if problem is not None:
                raise self._give_up(problem)

    def _migrate(self, path: str) -> None:
        with self._write() as db:
            migrate(db, path)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so it never fails half way on a lock;
        the counts its statements changed are written just before it commits."""
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                self._counts.apply(db)
            except BaseException:
                self._counts.clear()
                if db.in_transaction:  # SQLite ends it itself after some errors
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; an error that shows the file damaged
        makes this store unusable for good."""
        with self.lock:
            if self._unusable:  # a new error each time: one raised again grows its traceback
                raise StoreUnusable(self._unusable)
            try:
                yield self._db
            except sqlite3.Error as exc:
                if not is_damage(exc):
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
                known = (seen.get(key) or known_id(db, key)) if key else None
                new.append(known is None)
                if known is not None:
                    ids.append(known)
                    continue
                task_id = new_task_id()
                if key:
                    seen[key] = task_id
                rows.append(task_row(task_id, spec, now))
                self._counts.add(spec.queue, PENDING)
                ids.append(task_id)
            db.executemany(INSERT, rows)
            if any(spec.depends_on for spec in specs):
                DEPS.add(db, specs, ids, new, now)
        return ids

    def get(self, task_id: str) -> Task:
        with self._read() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,))
            return in_order(rows.fetchall(), [task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[Task]:
        with self._read() as db:
            rows = db.execute(_GET_MANY, (json.dumps(list(task_ids)),)).fetchall()
        return in_order(rows, task_ids)

    def get_final(self, task_ids: Sequence[str]) -> list[Task]:
        # Two statements, the second only when some task is final: SQLite spends more
        # on a wide row of NULLs than on a narrow one (FINAL_COLUMNS cost 3.4 us a
        # task, this 1.3), and one lock holds both.
        with self._read() as db:
            known = db.execute(_FINAL_OR_NOT, (json.dumps(list(task_ids)),)).fetchall()
            final = final_ids(known, task_ids)
            rows = db.execute(_GET_MANY, (json.dumps(final),)).fetchall() if final else []
        return in_order(rows, final)

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
        if limit <= 0:
            return []
        # dict.fromkeys drops repeats, which would offer one task twice.
        queue_list = list(dict.fromkeys(queues))
        queries: list[tuple[str, tuple[str | int, ...]]]
        if names is None:
            queries = [(CANDIDATES_BY_QUEUE, (q,)) for q in queue_list]
        else:
            name_list = list(dict.fromkeys(names))
            queries = [(CANDIDATES_BY_NAME, (q, n)) for q in queue_list for n in name_list]
        if exclude_keys:
            keys = json.dumps(sorted(exclude_keys))
            queries = [(without_keys(sql), (*args, keys, limit)) for sql, args in queries]
        else:
            queries = [(sql, (*args, limit)) for sql, args in queries]
        deadline = now + lease_s
        with self._write() as db:
            db.execute(f"UPDATE tasks SET ready = 1 WHERE {DELAYED} AND ready_at <= ?", (now,))
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
            tasks = [task_from_row(row[1:]) for row in rows]
            self._counts.moved(tasks, PENDING)
        return [Lease(task, deadline) for task in tasks]

    def running_by_key(self) -> dict[str, KeyLoad]:
        with self._read() as db:
            rows = db.execute(
                f"""SELECT ckey, count(*), min(ckey_limit) FROM tasks
                INDEXED BY tasks_running_by_key WHERE state = {RUNNING} AND ckey != ''
                GROUP BY ckey"""
            ).fetchall()
        return {key: KeyLoad(running, limit) for key, running, limit in rows}

    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        with self._write() as db:
            held = _held(db, refs)
            renewed: list[tuple[float, int]] = []
            stale: list[LeaseRef] = []
            for ref in refs:
                if _holds(held, ref, worker_id):
                    renewed.append((now + lease_s, held[ref.task_id].seq))
                else:
                    stale.append(ref)
            db.executemany("UPDATE tasks SET lease_deadline = ? WHERE seq = ?", renewed)
        return stale

    def set_progress(self, updates: Sequence[Progress]) -> list[Progress]:
        with self._write() as db:
            held = _held(db, [u.ref for u in updates])
            stored = [u for u in updates if _holds(held, u.ref)]
            db.executemany(
                "UPDATE tasks SET progress = ?, progress_message = ? WHERE seq = ?",
                [(u.fraction, u.message, held[u.ref.task_id].seq) for u in stored],
            )
        return stored

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        # A fixed number of statements a batch, not one per outcome: the fence of
        # every outcome read at once, the updates of each kind in one executemany,
        # the changed rows read at once. All under the write lock, so no row can
        # change between the fence read and the update.
        check_outcomes(outcomes)
        firsts = first_outcomes(outcomes)
        if not firsts:
            return []
        expiry = (now, default_expiry(self.policy, now))
        with self._write() as db:
            held = _held(db, [outcome.ref for outcome in firsts])
            updates: dict[str, list[tuple[Any, ...]]] = {}
            valid: list[str] = []
            seqs: list[int] = []
            for outcome in firsts:
                if not _holds(held, outcome.ref):
                    continue  # stale
                row = held[outcome.ref.task_id]
                delay_s = None
                if outcome.state is TaskState.FAILED:
                    # Whether it runs again depends on what the task has used up.
                    used = attempts_used(row.attempts, row.attempt_base, row.lost_leases)
                    delay_s = retry_delay_s(self.policy, outcome, used)
                changes, params = outcome_update(outcome, now, expiry, delay_s)
                updates.setdefault(changes, []).append((*params, row.seq))
                valid.append(outcome.ref.task_id)
                seqs.append(row.seq)
            for changes, values in updates.items():
                db.executemany(f"UPDATE tasks SET {changes} WHERE seq = ?", values)
            changed = []
            if valid:
                rows = db.execute(_GET_BY_SEQ, (json.dumps(seqs),)).fetchall()
                changed = in_order(rows, valid)
                self._counts.moved(changed, RUNNING)
            changed += self._settle(db, changed, now)
        return changed

    def _settle(self, db: sqlite3.Connection, changed: list[Task], now: float) -> list[Task]:
        """The dependents of the tasks that just ended, readied or cancelled."""
        ended = [(t.id, t.state) for t in changed if t.state.is_final]
        if not ended:
            return []
        expiry = default_expiry(self.policy, now)
        settled: list[Task] = DEPS.settle(db, ended, now, expiry, COLUMNS, task_from_row)
        self._counts.moved(settled, PENDING)  # readied ones stay PENDING
        return settled

    def retry(self, task_id: str, now: float) -> Task:
        with self._write() as db:
            old = _state(db, task_id)
            if old not in (FAILED, CANCELLED):
                raise FailedPrecondition(
                    f"task {task_id} is {old.name}: only FAILED or CANCELLED tasks can be retried"
                )
            row = db.execute(
                f"""UPDATE tasks SET state = {PENDING}, ready = 1, ready_at = ?,
                attempt_base = attempts, lost_leases = 0, lost_by = '[]', finished_at = 0,
                expires_at = 0 WHERE id = ? RETURNING {COLUMNS}""",
                (now, task_id),
            ).fetchone()
            task = task_from_row(row)
            self._counts.moved([task], old)
        return task

    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        with self._write() as db:
            held = _held(db, refs)
            released = {ref.task_id: held[ref.task_id] for ref in refs if _holds(held, ref)}
            db.executemany(
                f"""UPDATE tasks SET state = {PENDING}, ready = 1, ready_at = ?,
                    attempts = attempts - 1 WHERE seq = ?""",
                [(now, row.seq) for row in released.values()],
            )
            for row in released.values():
                self._counts.move(row.queue, RUNNING, PENDING)
        return len(released)

    def cancel(self, task_id: str, now: float) -> list[Task]:
        with self._write() as db:
            old = _state(db, task_id)
            if old.is_final:
                raise FailedPrecondition(f"task {task_id} is already {old.name}")
            row = db.execute(
                f"""UPDATE tasks SET state = {CANCELLED}, finished_at = ?, {EXPIRES}
                WHERE id = ? RETURNING {COLUMNS}""",
                (now, now, default_expiry(self.policy, now), task_id),
            ).fetchone()
            task = task_from_row(row)
            self._counts.moved([task], old)
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
                        error_traceback = '', finished_at = ?, {EXPIRES}"""
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
            self._counts.moved(expired, RUNNING)
            expired += self._settle(db, expired, now)
        return expired

    def prune(self, now: float, limit: int) -> int:
        return self._delete(
            """SELECT seq FROM tasks INDEXED BY tasks_expiring
            WHERE expires_at > 0 AND expires_at <= ? LIMIT ?""",
            (now, limit),
        )

    def purge(self, query: TaskQuery, limit: int) -> int:
        states = query.states or FINAL_STATES
        if not states <= FINAL_STATES:
            raise InvalidArgument("states: only finished tasks can be purged")
        where, params = where_clause(query, states, None, "?")
        return self._delete(f"SELECT seq FROM tasks WHERE {where} LIMIT ?", (*params, limit))

    def _delete(self, seqs: str, params: Sequence[Any]) -> int:
        """Delete the tasks whose seq the query ``seqs`` selects; how many there were."""
        with self._write() as db:
            rows = db.execute(
                f"DELETE FROM tasks WHERE seq IN ({seqs}) RETURNING queue, state", params
            ).fetchall()
            for queue, state in rows:
                self._counts.add(queue, state, -1)
        return len(rows)

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
                f"SELECT min(ready_at) FROM tasks WHERE {DELAYED} AND ready_at > ?", (now,)
            ).fetchone()
        # Tasks waiting for parents are delayed for ever (deps.WAITING_AT).
        ready_at: float | None = row[0]
        return None if ready_at is None or math.isinf(ready_at) else ready_at

    def stats(self) -> list[QueueCounts]:
        with self._read() as db:
            rows = db.execute("SELECT queue, state, n FROM counts ORDER BY queue").fetchall()
        return queue_counts(rows)

    def oldest_pending(self, now: float) -> dict[str, float]:
        with self._read() as db:
            rows = db.execute(OLDEST_PENDING).fetchall()
        return oldest_ready(rows, now)

    def pending_names(self, limit: int) -> list[PendingName]:
        with self._read() as db:
            rows = db.execute(PENDING_NAMES, (limit,)).fetchall()
        return [PendingName(*row) for row in rows]

    def close(self) -> None:
        with self.lock:  # even when unusable
            self._db.close()
            os.close(self._owner)  # and with it the claim on the file


def _state(db: sqlite3.Connection, task_id: str) -> TaskState:
    """The state of ``task_id`` before a write changes it; NotFound if there is none."""
    row = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise not_found(task_id)
    return TaskState(row[0])


class _Held(NamedTuple):
    """What a batch's fence reads of a RUNNING task: its lease and worker, the
    counts a failure's retry depends on, its queue (for the counts) and its seq,
    by which the batch's updates find the row without the id index."""

    lease: int
    worker_id: str
    attempts: int
    attempt_base: int
    lost_leases: int
    queue: str
    seq: int


def _held(db: sqlite3.Connection, refs: Sequence[LeaseRef]) -> dict[str, _Held]:
    """Each RUNNING task of ``refs`` by id. One read for a batch, under the write
    lock, so nothing changes before its updates, which need no fence of their own."""
    rows = db.execute(
        f"""SELECT id, lease, worker_id, attempts, attempt_base, lost_leases, queue, seq
        FROM tasks WHERE id IN (SELECT value FROM json_each(?)) AND state = {RUNNING}""",
        (json.dumps([ref.task_id for ref in refs]),),
    )
    return {row[0]: _Held._make(row[1:]) for row in rows}


def _holds(held: dict[str, _Held], ref: LeaseRef, worker_id: str | None = None) -> bool:
    """Whether ``ref`` is its task's current lease (held by ``worker_id``, if named)."""
    row = held.get(ref.task_id)
    return row is not None and row.lease == ref.lease and worker_id in (None, row.worker_id)


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
