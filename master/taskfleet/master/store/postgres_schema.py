"""The PostgreSQL store's tables, indexes and count triggers, as numbered migrations.

The schema is versioned: migrations run at open inside one transaction that
holds an advisory lock, so masters started together apply them once.
"""

from __future__ import annotations

from typing import Any

import psycopg

from taskfleet.common.errors import ConfigError
from taskfleet.master.store import postgres_bus
from taskfleet.master.store.postgres_sql import DELAYED, NO_LEASE_EPOCH, READY
from taskfleet.master.store.rows import PENDING, RUNNING

# Taken by every master while it migrates: any constant no other user of the
# database picks ("taskflee" in ASCII).
MIGRATION_LOCK = 0x7461736B666C6565

COUNT_FUNCTION = """
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

# The least lease number a claim may hand out (postgres_sql.CLAIM). A function
# rather than a subquery only to raise when no epoch is live; it costs no more
# (backend CPU a claim, measured).
LEASE_FLOOR_FUNCTION = f"""
CREATE FUNCTION taskfleet_lease_floor() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    live bigint;
BEGIN
    SELECT epoch INTO live FROM lease_epoch_live;
    IF live IS NULL THEN
        RAISE EXCEPTION 'no live lease epoch' USING ERRCODE = '{NO_LEASE_EPOCH}';
    END IF;
    RETURN live << 32;
END $$
"""

# Each schema version's statements, applied in order inside one transaction;
# taskfleet_schema records the last one applied.
MIGRATIONS: dict[int, tuple[str, ...]] = {
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
        f" WHERE {READY}",
        f"CREATE INDEX tasks_ready_by_queue ON tasks (queue, priority DESC, seq) WHERE {READY}",
        f"CREATE INDEX tasks_delayed ON tasks (ready_at) WHERE {DELAYED}",
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
        COUNT_FUNCTION,
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
    6: postgres_bus.RATE_MIGRATION,
    # current_task().set_progress: the last value a task set.
    7: (
        "ALTER TABLE tasks ADD COLUMN progress double precision NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN progress_message text NOT NULL DEFAULT ''",
    ),
    # Concurrency keys (master/concurrency.py): RUNNING tasks are counted per key.
    8: (
        "ALTER TABLE tasks ADD COLUMN ckey text NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN ckey_limit integer NOT NULL DEFAULT 0",
        f"CREATE INDEX tasks_running_by_key ON tasks (ckey) WHERE state = {RUNNING} AND ckey <> ''",
    ),
    # Stats' oldest pending task per queue (store.oldest_pending, rows.OLDEST_PENDING).
    9: (f"CREATE INDEX tasks_pending_since ON tasks (queue, ready_at) WHERE state = {PENDING}",),
    # Lease numbers a crash of the server cannot hand out twice (postgres_sql.CLAIM):
    # an epoch on disk, started anew after each crash, floors every lease at
    # epoch << 32. Its live copy is UNLOGGED, so crash recovery empties it, and
    # that is what tells the next claim to start one. A database that has tasks
    # starts at epoch 0, whose successor (1) lifts its leases above any a crash
    # before this upgrade may have lost; a new one at -1, so that its leases
    # count from 1 until its first crash. The ALTER rewrites the tasks table, once.
    10: (
        "ALTER TABLE tasks ALTER COLUMN lease TYPE bigint",
        "CREATE TABLE lease_epoch (epoch bigint NOT NULL)",
        "INSERT INTO lease_epoch SELECT CASE WHEN EXISTS (SELECT FROM tasks) THEN 0 ELSE -1 END",
        "CREATE UNLOGGED TABLE lease_epoch_live"
        " (one boolean PRIMARY KEY DEFAULT true CHECK (one), epoch bigint NOT NULL)",
        LEASE_FLOOR_FUNCTION,
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


def migrate(conn: psycopg.Connection[Any], where: str) -> None:
    """Bring the database ``conn`` reaches (``where``, for messages) to SCHEMA_VERSION."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS taskfleet_schema (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM taskfleet_schema").fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{where} has taskfleet schema version {version}; "
                f"this taskfleet reads versions up to {SCHEMA_VERSION}"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number]:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute("DELETE FROM taskfleet_schema")
            conn.execute("INSERT INTO taskfleet_schema VALUES (%s)", (SCHEMA_VERSION,))
