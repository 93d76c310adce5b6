"""A master whose PostgreSQL server goes away: stopped as a crash would stop it,
restarted, or gone for seconds. The store fails fast with StoreUnavailable, the
master says NOT_SERVING and refuses calls with UNAVAILABLE, workers keep their
tasks, and everything comes back by itself when the server does.

The tests stop a server of this module's own (pg.own_server), never the
session's shared one; each test leaves it running for the next."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from taskfleet.common.client import make_spec, task_result
from taskfleet.common.errors import StoreUnavailable, Unavailable
from taskfleet.common.model import TaskSpec, TaskState
from taskfleet.master.store.postgres import PostgresStore

import pg
from procs import Gates, MasterProc, WorkerProc, poll
from test_observability import (
    NOT_SERVING,
    RUN_TOTAL,
    SERVICES,
    SERVING,
    health_status,
    metrics_flag,
    sample,
    scrape,
)
from test_store_postgres import PASSWORD, with_password

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]
WAIT_S = 30.0
OUTAGE_S = 10.0  # the deliberate outage of the second test
# A call during an outage must fail within this: the pool's timeout, with room to spare.
FAIL_WITHIN_S = 10.0
SUCCEEDED = "taskfleet_tasks_succeeded_total"


@pytest.fixture(scope="module")
def own_server() -> Iterator[pg.Server]:
    with pg.own_server() as own:
        yield own


@pytest.fixture
def server(own_server: pg.Server) -> Iterator[pg.Server]:
    """The module's server, running; started again after a test that left it down."""
    yield own_server
    if not own_server.up:
        own_server.start()


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """What ``call`` raised (None if nothing) and how long it took."""
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_the_store_fails_fast_while_the_server_is_down_and_recovers_on_ping(
    server: pg.Server,
) -> None:
    # Given a store whose pool holds several connections to its server
    store = PostgresStore(with_password(server.admin_dsn))
    lost: list[str] = []
    store.on_unavailable = lambda: lost.append(threading.current_thread().name)
    try:
        [task_id] = store.submit([TaskSpec(name="add", queue="q")], 1.0)
        fill_pool(store)

        # When the server stops as a crash would stop it
        server.stop("immediate")

        # Then a call fails with StoreUnavailable saying why, without the password,
        # within seconds, and the store tells its owner once
        error, took_s = timed(lambda: store.get(task_id))
        assert isinstance(error, StoreUnavailable), error
        assert str(error).startswith("database unreachable: ")
        assert PASSWORD not in str(error)
        assert took_s < FAIL_WITHIN_S
        assert len(lost) == 1
        # and later calls fail at once, without telling it again
        error, took_s = timed(lambda: store.submit([TaskSpec(name="add", queue="q")], 2.0))
        assert isinstance(error, StoreUnavailable)
        assert len(lost) == 1
        # and a ping says the database is still away
        error, _ = timed(store.ping)
        assert isinstance(error, StoreUnavailable)
        assert PASSWORD not in str(error)

        # When the server is back
        server.start()

        # Then the first ping brings the store back, and calls work again: not one
        # of the connections that died with the server is handed out
        store.ping()
        for _ in range(8):
            assert store.get(task_id).state is TaskState.PENDING
        assert len(lost) == 1
    finally:
        store.close()


def test_after_a_restart_one_ping_replaces_every_dead_pooled_connection(
    server: pg.Server,
) -> None:
    # Given a store whose pool holds several connections to its server
    store = PostgresStore(server.admin_dsn)
    lost: list[str] = []
    store.on_unavailable = lambda: lost.append("lost")
    try:
        fill_pool(store)

        # When the server restarts while the store is idle
        server.restart("fast")

        # Then one ping answers (its pooled connection failed, a fresh one did not)
        # and tells the store's owner once, and every later call works
        store.ping()
        assert lost == ["lost"]
        for _ in range(8):
            assert store.stats() is not None
    finally:
        store.close()


def test_after_a_crash_every_lease_number_is_above_all_handed_out_before(
    server: pg.Server,
) -> None:
    # Given a database on a server whose WAL writer flushes only every 10 s, so
    # that claims (commits that do not wait for the disk) stay in memory a while
    with pg.database_on(server.admin_dsn) as url:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            conn.execute("SELECT pg_reload_conf()")
        store = PostgresStore(url)
        try:
            ids = store.submit([TaskSpec(name="noop", queue="q") for _ in range(10)], 1.0)
            # and its tasks claimed one at a time, the last ones most likely not on disk
            before = [
                one.ref
                for n in range(10)
                for one in store.lease("w", ["q"], None, 1, 60.0, 2.0 + n)
            ]
            assert sorted(ref.task_id for ref in before) == sorted(ids)

            # When the server crashes at once and starts again
            server.stop("immediate")
        finally:
            store.close()
            if not server.up:
                server.start()
            with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM RESET wal_writer_delay")
                conn.execute("SELECT pg_reload_conf()")

        # Then, once the claims that survived are given back, every task claimed
        # again gets a lease number above every one handed out before the crash,
        # whether its claim was lost or not
        store = PostgresStore(url)
        try:
            store.release(before, 20.0)
            assert {task.state for task in store.get_many(ids)} == {TaskState.PENDING}
            after = [one.ref for one in store.lease("w", ["q"], None, 10, 60.0, 21.0)]
        finally:
            store.close()
    assert sorted(ref.task_id for ref in after) == sorted(ids)
    assert min(ref.lease for ref in after) > max(ref.lease for ref in before)


def fill_pool(store: PostgresStore) -> None:
    """Calls at once on four threads, so the pool opens several connections."""
    threads = [
        threading.Thread(
            target=store._run, args=(lambda conn: conn.execute("SELECT pg_sleep(0.1)"),)
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)


def test_a_restart_of_the_server_mid_run_loses_nothing_and_ends_no_task_twice(
    server: pg.Server,
    start_master: StartMaster,
    start_worker: StartWorker,
    queue_name: str,
) -> None:
    # Given a master on the server, counting finished tasks, and two workers
    metrics, flags = metrics_flag()
    master = start_master(store=server.admin_dsn, extra=flags)
    for _ in range(2):
        start_worker(master, queues=queue_name, concurrency=4)
    count = 400

    def succeeded() -> float:
        samples = scrape(metrics)
        return sample(samples, SUCCEEDED, queue=queue_name, task="slow_square") or 0.0

    with master.client() as client:
        ids = client.submit_many(
            make_spec("slow_square", [n, 0.05], queue=queue_name) for n in range(count)
        )

        # When the server restarts while tasks flow
        poll(lambda: succeeded() >= 40, WAIT_S, "tasks to flow")
        server.restart("fast")
        assert succeeded() < count, "the run ended before the restart: make it longer"

        # Then every task ends SUCCEEDED with its result
        finished = list(client.wait(ids, timeout_s=60))
    assert sorted(t.id for t in finished) == sorted(ids)
    assert {t.state for t in finished} == {TaskState.SUCCEEDED}
    assert [task_result(t) for t in sorted(finished, key=lambda t: ids.index(t.id))] == [
        n * n for n in range(count)
    ]
    # and each ended once: the master counted one final state per task
    assert succeeded() == count
    with psycopg.connect(server.admin_dsn) as conn:
        (counted,) = conn.execute(
            "SELECT count(*) FROM tasks WHERE queue = %s AND state = %s",
            (queue_name, TaskState.SUCCEEDED.value),
        ).fetchone() or (0,)
    assert counted == count
    # and the master logged the outage in a line or two, not a traceback per call
    master.stop()
    assert "Traceback" not in master.output(), master.output()


def test_a_server_stopped_for_seconds_makes_the_master_not_serving_until_it_returns(
    server: pg.Server,
    start_master: StartMaster,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a master on the server (its password in the URL), a worker running a
    # task that outlives the outage, and tasks that come due about when it ends
    # (delayed, so that no lease of theirs is in flight when the server stops)
    metrics, flags = metrics_flag()
    master = start_master(store=with_password(server.admin_dsn), extra=flags)
    worker_metrics, worker_flags = metrics_flag()
    worker = start_worker(master, queues=queue_name, concurrency=1, extra=worker_flags)
    gate = gates.new("across")
    with master.client() as client:
        across = client.submit("block_until", [gate], queue=queue_name)
        poll(lambda: Gates.started(gate, 1), WAIT_S, "the long task to start")
        due = time.time() + OUTAGE_S
        queued = client.submit_many(
            make_spec("square", [n], queue=queue_name, not_before=due) for n in range(20)
        )

    # When the server stops as a crash would stop it
    server.stop("immediate")
    stopped_at = time.monotonic()

    # Then health says NOT_SERVING, overall and for each service
    poll(lambda: health_status(master.address) == NOT_SERVING, WAIT_S, "NOT_SERVING")
    for service in SERVICES:
        assert health_status(master.address, service) == NOT_SERVING
    # and a Submit is refused with UNAVAILABLE, naming the database, within seconds
    with master.client() as client:
        error, took_s = timed(lambda: client.submit("square", [1], queue=queue_name))
    assert isinstance(error, Unavailable), error
    assert "database unreachable" in str(error)
    assert PASSWORD not in str(error)
    assert took_s < FAIL_WITHIN_S
    # and metrics are still served, without the queue depths only the store knows
    samples = scrape(metrics)
    assert sample(samples, "taskfleet_workers_connected") is not None
    assert not any(name == "taskfleet_queue_depth" for name, _ in samples)
    # and the worker keeps its task: it finishes during the outage, held by the worker
    gates.open(gate)
    poll(
        lambda: sample(scrape(worker_metrics), RUN_TOTAL, task="block_until", outcome="succeeded"),
        WAIT_S,
        "the long task to finish in the worker",
    )
    assert health_status(master.address) == NOT_SERVING  # still in the outage
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))  # the outage itself
    assert worker.popen.poll() is None

    # When the server is back
    server.start()

    # Then the master serves again by itself
    poll(lambda: health_status(master.address) == SERVING, WAIT_S, "SERVING again")
    for service in SERVICES:
        assert health_status(master.address, service) == SERVING
    # and every task ends SUCCEEDED; the long one on its first and only attempt
    with master.client() as client:
        finished = {t.id: t for t in client.wait([across, *queued], timeout_s=WAIT_S)}
        assert client.run("square", [7], queue=queue_name, timeout_s=WAIT_S) == 49
    assert {t.state for t in finished.values()} == {TaskState.SUCCEEDED}
    assert len(finished) == 1 + len(queued)
    assert finished[across].attempts == 1
    assert [task_result(finished[i]) for i in queued] == [n * n for n in range(20)]

    # and the master said so once each way, with no traceback and no password
    master.stop()
    output = master.output()
    assert output.count("NOT_SERVING until it answers") == 1, output
    assert output.count("answers again") == 1, output
    assert "Traceback" not in output, output
    assert PASSWORD not in output
    # and no lease lapsed: the worker renewed its own once it was back
    assert "leases lapsed" not in output, output
