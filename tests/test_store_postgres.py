"""What only the PostgreSQL store has: its URL, its schema versions and its errors.
The Store contract itself runs on it in test_store_contract.py and its siblings."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from taskfleet.common.client import make_spec
from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ConfigError
from taskfleet.common.model import LeaseRef, Outcome, TaskSpec, TaskState
from taskfleet.master.store import Store, open_store, postgres_sql, redacted
from taskfleet.master.store.postgres import PostgresStore
from taskfleet.master.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION

import pg
from procs import MasterProc, WorkerProc

PASSWORD = "s3cret-Pa55"


def with_password(url: str, password: str = PASSWORD) -> str:
    scheme, _, rest = url.partition("://")
    user, _, where = rest.partition("@")
    return f"{scheme}://{user}:{password}@{where}"


def test_open_store_understands_both_postgres_schemes() -> None:
    with pg.database() as url:
        for scheme in ("postgresql", "postgres"):
            store = open_store(scheme + url.removeprefix("postgresql"))
            assert isinstance(store, PostgresStore)
            store.close()


def test_a_database_that_cannot_be_reached_is_a_config_error_without_the_password() -> None:
    url = with_password(pg.with_database(pg.admin_dsn(), "no_such_database"))

    with pytest.raises(ConfigError) as raised:
        open_store(url)

    message = str(raised.value)
    assert PASSWORD not in message
    assert "no_such_database" in message
    assert "does not exist" in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://tf:{PASSWORD}@db.example:5433/tasks",
            "postgresql://tf@db.example:5433/tasks",
        ),
        (
            f"postgres://tf:{PASSWORD}@db/tasks?sslmode=require",
            "postgres://tf@db/tasks?sslmode=require",
        ),
        (f"postgresql://tf@db/tasks?password={PASSWORD}", "postgresql://tf@db/tasks"),
        (
            f"host=db user=tf password={PASSWORD} dbname=tasks",
            "host=db user=tf password=*** dbname=tasks",
        ),
        ("postgresql://db/tasks", "postgresql://db/tasks"),
        ("sqlite:./taskfleet.db", "sqlite:./taskfleet.db"),
        (f"postgresq://tf:{PASSWORD}@db/tasks", "postgresq://tf@db/tasks"),
    ],
)
def test_redacted_drops_the_password_wherever_it_is(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_the_master_config_shows_its_store_without_the_password() -> None:
    config = MasterConfig(store=f"postgresql://tf:{PASSWORD}@db/tasks")

    assert PASSWORD not in repr(config)
    assert "postgresql://tf@db/tasks" in repr(config)


def test_a_mistyped_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        open_store(f"postgresq://tf:{PASSWORD}@db/tasks")

    assert PASSWORD not in str(raised.value)
    assert "postgresq://tf@db/tasks" in str(raised.value)


def test_without_psycopg_open_store_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    monkeypatch.delitem(sys.modules, "taskfleet.master.store.postgres")

    with pytest.raises(ConfigError) as raised:
        open_store(with_password("postgresql://tf@127.0.0.1/tasks"))

    message = str(raised.value)
    assert "pip install 'taskfleet[postgres]'" in message
    assert "\n" not in message
    assert PASSWORD not in message


def test_a_database_of_a_newer_schema_is_refused_naming_both_versions() -> None:
    with pg.database() as url:
        open_store(url).close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE taskfleet_schema SET version = %s", (SCHEMA_VERSION + 1,))

        with pytest.raises(ConfigError) as raised:
            open_store(url)

    message = str(raised.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"versions up to {SCHEMA_VERSION}" in message


def test_masters_opening_a_new_database_together_migrate_it_once() -> None:
    opened: list[Store] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one(url: str) -> None:
        start.wait(timeout=30)
        try:
            opened.append(open_store(url))
        except BaseException as exc:
            errors.append(exc)

    with pg.database() as url:
        threads = [threading.Thread(target=open_one, args=(url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        try:
            assert errors == []
            assert len(opened) == 4
            [task_id] = opened[0].submit([TaskSpec(name="add", queue="q")], 1.0)
            assert opened[3].get(task_id).id == task_id
        finally:
            for store in opened:
                store.close()


def test_a_master_on_postgres_runs_tasks_and_keeps_them_across_kill_9(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    with pg.database() as url:
        # Given a master on PostgreSQL whose worker has run 200 tasks
        master = start_master(store=with_password(url))
        start_worker(master, queues=queue_name, pool="thread", concurrency=4)
        with master.client() as client:
            ids = client.submit_many(make_spec("square", [n], queue=queue_name) for n in range(200))
            finished = list(client.wait(ids, timeout_s=60))
        assert sorted(t.state for t in finished) == [TaskState.SUCCEEDED] * 200

        # When the master is killed and started again on the same database
        master.kill()
        master = start_master(store=with_password(url), port=master.port)

        # Then every result is still there, and the worker's new tasks run
        with master.client() as client:
            assert [client.result(task_id) for task_id in ids] == [n * n for n in range(200)]
            assert client.run("square", [12], queue=queue_name, timeout_s=60) == 144
        master.stop()
    assert PASSWORD not in master.output()


def test_a_lease_by_names_reads_only_its_names_not_the_whole_queue() -> None:
    # Given 2,000 ready tasks of one name in a queue, on a new table (no statistics)
    with pg.database() as url:
        store = PostgresStore(url)
        try:
            store.submit([TaskSpec(name="noop", queue="q") for _ in range(2000)], 1.0)

            # When the claim of a worker that serves that name and others is planned
            params = {
                "queues": ["q"],
                "names": ["add", "fail", "noop", "square"],
                "limit": 50,
                "worker": "w",
                "now": 2.0,
                "deadline": 32.0,
            }
            with psycopg.connect(url) as conn:
                [plan] = conn.execute(
                    "EXPLAIN (FORMAT JSON) " + postgres_sql.CLAIM_BY_NAME, params
                ).fetchone()
        finally:
            store.close()

    # Then it takes each name's tasks from the index by name, rather than reading
    # every ready task of the queue for each name that has none
    scans = {node["Index Name"] for node in _plan_nodes(plan[0]["Plan"]) if "Index Name" in node}
    assert "tasks_ready_by_name" in scans
    assert "tasks_ready_by_queue" not in scans


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


def test_a_lease_does_not_leave_its_connection_committing_without_waiting() -> None:
    # Given a database whose commits wait for the disk (the tests' server does not)
    with pg.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET synchronous_commit = on')
        store = PostgresStore(url)
        try:
            store.submit([TaskSpec(name="noop", queue="q") for _ in range(3)], 1.0)

            # When a lease claims tasks (its commit does not wait for the flush)
            assert len(store.lease("w", ["q"], None, 3, 30.0, 2.0)) == 3

            # Then the connection it used waits again for what comes next (a record)
            with store._pool.connection() as conn:
                [setting] = conn.execute("SHOW synchronous_commit").fetchone()
        finally:
            store.close()
    assert setting == "on"


def test_a_crash_of_the_server_keeps_every_recorded_outcome_and_every_task() -> None:
    with pg.own_server() as server:
        # Given tasks claimed (a commit that does not wait for the disk), and the
        # outcomes of half of them recorded (one that does)
        store = PostgresStore(server.admin_dsn)
        try:
            ids = store.submit([TaskSpec(name="noop", queue="q") for _ in range(6)], 1.0)
            leases = store.lease("w", ["q"], None, 6, 30.0, 2.0)
            assert len(leases) == 6
            done = [lease.ref for lease in leases[:3]]
            store.record([Outcome(ref, TaskState.SUCCEEDED, result=b"7") for ref in done], 3.0)

            # When the server crashes at once (no shutdown checkpoint) and starts again
            server.stop("immediate")
        finally:
            store.close()
        server.start()

        # Then the outcomes are there, with the claims they came from, and no task is lost
        store = PostgresStore(server.admin_dsn)
        try:
            tasks = {task.id: task for task in store.get_many(ids)}
        finally:
            store.close()
    assert sorted(tasks) == sorted(ids)
    for ref in done:
        assert tasks[ref.task_id].state is TaskState.SUCCEEDED
        assert tasks[ref.task_id].result == b"7"
        assert tasks[ref.task_id].lease == ref.lease
    rest = [task for task_id, task in tasks.items() if task_id not in {r.task_id for r in done}]
    assert {task.state for task in rest} <= {TaskState.RUNNING, TaskState.PENDING}


# The columns a claim sets (postgres_sql.CLAIM), which a lost commit leaves as they were.
CLAIMED = "state, attempts, lease, worker_id, started_at, lease_deadline"


def test_a_claim_undone_by_a_crash_is_never_handed_out_again_with_its_lease_number() -> None:
    with pg.database() as url:
        # Given a task claimed by one worker, with a commit that did not wait for
        # the disk (after an earlier claim, which found the database's lease epoch)
        store = PostgresStore(url)
        try:
            first_id, task_id = store.submit([TaskSpec(name="noop", queue="q")] * 2, 1.0)
            assert [one.task.id for one in store.lease("w0", ["q"], None, 1, 30.0, 2.0)] == [
                first_id
            ]
            with psycopg.connect(url, autocommit=True) as conn:
                before = conn.execute(
                    f"SELECT {CLAIMED} FROM tasks WHERE id = %s", (task_id,)
                ).fetchone()
            [stale] = store.lease("w1", ["q"], None, 1, 30.0, 3.0)
            assert stale.task.id == task_id
        finally:
            store.close()

        # When the server crashes before that commit reaches the disk: recovery
        # puts the row back as it was and empties every unlogged table, and the
        # store's connections all die with the server
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"UPDATE tasks SET ({CLAIMED}) = (%s, %s, %s, %s, %s, %s) WHERE id = %s",
                (*before, task_id),
            )
            for (name,) in conn.execute(
                "SELECT relname FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r'"
                " AND relnamespace = 'public'::regnamespace"
            ).fetchall():
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(name)))
        store = PostgresStore(url)
        try:
            assert store.get(task_id).state is TaskState.PENDING

            # Then the next claim of the task hands out a greater lease number than
            # the lost one, so the worker still running the lost claim is refused
            # and the new holder's result is the one kept
            [fresh] = store.lease("w2", ["q"], None, 1, 30.0, 4.0)
            assert fresh.task.id == task_id
            assert fresh.ref.lease > stale.ref.lease
            assert store.record([Outcome(stale.ref, TaskState.SUCCEEDED, result=b"old")], 5.0) == []
            [done] = store.record([Outcome(fresh.ref, TaskState.SUCCEEDED, result=b"new")], 5.0)
            assert (done.result, done.worker_id) == (b"new", "w2")
            assert store.get(task_id).result == b"new"
        finally:
            store.close()


def test_a_lease_epoch_is_on_disk_before_a_claim_uses_it() -> None:
    # Given a database whose commits do not wait for the disk (the tests' server),
    # with ready tasks
    with pg.database() as url:
        store = PostgresStore(url)
        try:
            store.submit([TaskSpec(name="noop", queue="q") for _ in range(3)], 1.0)
        finally:
            store.close()
        params = {"queues": ["q"], "limit": 1, "worker": "w", "now": 2.0, "deadline": 32.0}
        with psycopg.connect(url, autocommit=True) as conn:
            # When a claim finds no live epoch (the database's first claim; later,
            # the first after a crash emptied it), and one is started
            with pytest.raises(psycopg.Error) as raised:
                conn.execute(postgres_sql.CLAIM_BY_QUEUE, params)
            with conn.transaction():
                conn.execute(postgres_sql.NEW_LEASE_EPOCH)
                [starting] = conn.execute("SHOW synchronous_commit").fetchall()
            # and tasks are claimed, then the live epoch is emptied as crash
            # recovery empties it, and another is started
            conn.execute(postgres_sql.CLAIM_BY_QUEUE, params)
            conn.execute(postgres_sql.CLAIM_BY_QUEUE, params)
            conn.execute("TRUNCATE lease_epoch_live")
            conn.execute(postgres_sql.NEW_LEASE_EPOCH)
            conn.execute(postgres_sql.CLAIM_BY_QUEUE, params)
            [[epoch]] = conn.execute("SELECT epoch FROM lease_epoch").fetchall()
            leases = [row[0] for row in conn.execute("SELECT lease FROM tasks ORDER BY seq")]
            states = [row[0] for row in conn.execute("SELECT state FROM tasks ORDER BY seq")]

    # Then the claim without an epoch claimed nothing and said why, the start of
    # an epoch waits for the disk (so none of its leases is used before it is
    # there), and each epoch floors the leases claimed in it
    assert raised.value.sqlstate == postgres_sql.NO_LEASE_EPOCH
    assert starting == ("on",)
    assert epoch == 1
    assert leases == [1, 1, 1 << 32]
    assert states == [TaskState.RUNNING.value] * 3


def test_a_version_9_database_is_migrated_and_its_leases_go_on_above_the_old_ones() -> None:
    # Given a database of schema version 9 (leases of 32 bits, no lease epoch),
    # left by a server that may have lost claims, with a task running on lease 7
    # and one waiting
    running, waiting = "running", "waiting"
    with pg.database() as url:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE taskfleet_schema (version integer NOT NULL)")
            for number in range(1, 10):
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
            conn.execute("INSERT INTO taskfleet_schema VALUES (9)")
            conn.execute(
                "INSERT INTO tasks (id, name, queue, payload, content_type, priority,"
                " max_attempts, timeout_s, not_before, idempotency_key, metadata, result_ttl_s,"
                " ready, ready_at, created_at, state, lease, attempts, worker_id)"
                " SELECT id, 'noop', 'q', '', '', 0, 1, 0, 0, '', '{}', 0, true, 0, 0, state,"
                " lease, attempts, worker_id FROM (VALUES (%s, %s::smallint, 7, 1, 'w0'),"
                " (%s, %s::smallint, 0, 0, '')) AS v(id, state, lease, attempts, worker_id)",
                (running, TaskState.RUNNING.value, waiting, TaskState.PENDING.value),
            )

        # When a master of this version opens it
        store = PostgresStore(url)
        try:
            # Then it is at this version, the running lease is still the current
            # one, and the next claim's lease is above any a crash may have lost
            [claimed] = store.lease("w1", ["q"], None, 2, 30.0, 2.0)
            assert claimed.task.id == waiting
            assert claimed.ref.lease >= 1 << 32
            [done] = store.record([Outcome(LeaseRef(running, 7), TaskState.SUCCEEDED)], 3.0)
            assert done.state is TaskState.SUCCEEDED
        finally:
            store.close()
        with psycopg.connect(url) as conn:
            [[version]] = conn.execute("SELECT version FROM taskfleet_schema").fetchall()
            [[lease_type]] = conn.execute(
                "SELECT data_type FROM information_schema.columns"
                " WHERE table_name = 'tasks' AND column_name = 'lease'"
            ).fetchall()
    assert version == SCHEMA_VERSION
    assert lease_type == "bigint"
