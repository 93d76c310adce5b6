"""The SQLite store's tables and indexes, as numbered migrations
applied at open (``PRAGMA user_version`` holds the version of a file)."""

from __future__ import annotations

import sqlite3

from taskfleet.common.errors import ConfigError
from taskfleet.master.store.rows import PENDING, RUNNING

# A PENDING task is either ready (ready = 1) or delayed until ready_at (ready = 0),
# so the ready index never holds tasks that must be skipped over.
READY = f"state = {PENDING} AND ready = 1"
DELAYED = f"state = {PENDING} AND ready = 0"

SCHEMA = (
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
    f"CREATE INDEX tasks_ready_by_name ON tasks (queue, name, priority DESC, seq) WHERE {READY}",
    f"CREATE INDEX tasks_ready_by_queue ON tasks (queue, priority DESC, seq) WHERE {READY}",
    f"CREATE INDEX tasks_delayed ON tasks (ready_at) WHERE {DELAYED}",
    f"CREATE INDEX tasks_running ON tasks (lease_deadline) WHERE state = {RUNNING}",
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key != ''",
    # Counts kept in the same transaction as the rows (by these triggers until
    # version 9, since by sqlite_sql.Counts), so stats() costs O(queues) and can
    # never drift from the tasks, even across a crash.
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
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: SCHEMA,
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
    # current_task().set_progress: the last value a task set.
    6: (
        "ALTER TABLE tasks ADD COLUMN progress REAL NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN progress_message TEXT NOT NULL DEFAULT ''",
    ),
    # Concurrency keys (master/concurrency.py): RUNNING tasks are counted per key.
    7: (
        "ALTER TABLE tasks ADD COLUMN ckey TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN ckey_limit INTEGER NOT NULL DEFAULT 0",
        f"CREATE INDEX tasks_running_by_key ON tasks (ckey) WHERE state = {RUNNING} AND ckey != ''",
    ),
    # Stats' oldest pending task per queue (store.oldest_pending, rows.OLDEST_PENDING).
    8: (f"CREATE INDEX tasks_pending_since ON tasks (queue, ready_at) WHERE state = {PENDING}",),
    # The write methods keep the counts at a few statements a batch (sqlite_sql.Counts)
    # where SQLite ran these triggers once a row. A file's counts are right as they stand.
    9: (
        "DROP TRIGGER tasks_count_insert",
        "DROP TRIGGER tasks_count_update",
        "DROP TRIGGER tasks_count_delete",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the file ``path`` (open as ``db``, in a write transaction) to SCHEMA_VERSION."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has taskfleet schema version {version}; "
            f"this taskfleet reads versions up to {SCHEMA_VERSION}"
        )
    for number in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[number]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
