"""Several masters on one PostgreSQL database: one queue, whichever master a
worker or a client talks to."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest

from taskfleet.common.client import Client, make_spec
from taskfleet.common.model import Stats, TaskState

import pg
from procs import Gates, MasterProc, WorkerProc, alive, poll

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


@pytest.fixture
def db() -> Iterator[str]:
    with pg.database() as url:
        yield url


def _masters(
    start_master: StartMaster, db: str, count: int, lease_s: float = 2.0
) -> list[MasterProc]:
    return [start_master(store=db, lease_s=lease_s) for _ in range(count)]


def test_a_task_submitted_on_one_master_runs_on_a_worker_of_another(
    db: str, start_master: StartMaster, start_worker: StartWorker
) -> None:
    a, b = _masters(start_master, db, 2)
    start_worker(b)
    with a.client() as client:
        task_id = client.submit("square", [7])
        assert client.result(task_id, timeout_s=30) == 49
        # SubmitAndWait and a batched wait on A see results recorded through B.
        assert client.run("square", [8], timeout_s=30) == 64
        ids = client.submit_many([make_spec("square", [n]) for n in range(50)])
        finished = list(client.wait(ids, timeout_s=30))
    assert sorted(t.id for t in finished) == sorted(ids)
    assert all(t.state is TaskState.SUCCEEDED for t in finished)
    assert _listeners(db) == 2  # one connection per master, held for notifications


def test_a_cancel_on_one_master_stops_the_task_on_a_worker_of_another(
    db: str, start_master: StartMaster, start_worker: StartWorker, gates: Gates
) -> None:
    a, b = _masters(start_master, db, 2)
    start_worker(b, pool="process", concurrency=1)
    gate = gates.new("held")
    with a.client() as client:
        task_id = client.submit("block_until", [gate])
        pool_pid = poll(lambda: gates.started(gate, 1), what="the task to start on B's worker")
        assert client.cancel(task_id).state is TaskState.CANCELLED
        # B's worker kills the pool process running it, and serves on from a fresh one.
        poll(lambda: not alive(pool_pid), what="the cancelled task's process to be killed")
        assert client.run("square", [3], timeout_s=30) == 9
        assert client.get(task_id).state is TaskState.CANCELLED


def test_stats_on_any_master_list_every_master_and_every_worker(
    db: str, start_master: StartMaster, start_worker: StartWorker
) -> None:
    a, b, c = _masters(start_master, db, 3)
    workers = [start_worker(m) for m in (a, b, c)]
    wanted = {w.pid for w in workers}

    def complete(client: Client) -> Stats | None:
        stats = client.stats()
        pids = {w.pid for w in stats.workers}
        return stats if pids == wanted and len(stats.masters) == 3 else None

    for master in (a, b, c):
        with master.client() as client:
            stats = poll(lambda: complete(client), what="every worker and master in stats")
        listens = sorted(m.listen for m in stats.masters)
        assert listens == sorted(m.address for m in (a, b, c))
        by_pid = {w.pid: w.master_id for w in stats.workers}
        master_ids = {m.listen: m.master_id for m in stats.masters}
        assert [by_pid[w.pid] for w in workers] == [master_ids[m.address] for m in (a, b, c)]

    # A master killed outright is forgotten by the others, with its workers.
    c.kill()
    with a.client() as client:
        poll(
            lambda: [len(s.masters), len(s.workers)] == [2, 2] if (s := client.stats()) else None,
            what="the killed master to be forgotten",
        )


def test_ten_thousand_tasks_over_three_masters_each_leased_once(
    db: str, start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Leases long enough that none lapses on a loaded machine (a lapse hands the
    # task out again, as it should): only two masters claiming one task can fail this.
    masters = _masters(start_master, db, 3, lease_s=60)
    for master in masters:
        start_worker(master, concurrency=4)
    ids: list[str] = []
    clients = [m.client() for m in masters]
    try:
        for i in range(10):
            client = clients[i % 3]
            ids += client.submit_many(
                [make_spec("square", [n]) for n in range(i * 1000, (i + 1) * 1000)]
            )
        finished = {t.id: t for t in clients[1].wait(ids, timeout_s=120)}
    finally:
        for client in clients:
            client.close()
    assert len(finished) == 10_000
    assert all(t.state is TaskState.SUCCEEDED for t in finished.values())
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT state, lease, attempts, count(*) FROM tasks GROUP BY state, lease, attempts"
        ).fetchall()
    # Every task was claimed once: lease number 1, one attempt, no second claim.
    assert rows == [(int(TaskState.SUCCEEDED), 1, 1, 10_000)]


def test_an_idempotency_key_is_one_task_whichever_masters_see_it(
    db: str, start_master: StartMaster
) -> None:
    masters = _masters(start_master, db, 3)
    clients = [m.client() for m in masters]
    ids: list[str] = []
    errors: list[BaseException] = []

    def submit(client: Client) -> None:
        try:
            for n in range(20):
                ids.append(client.submit("square", [n], idempotency_key=f"key-{n}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    assert not errors
    assert len(ids) == 60
    assert len(set(ids)) == 20
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
    assert row == (20,)


def test_poll_only_masters_share_work_without_notifications(
    db: str, start_master: StartMaster, start_worker: StartWorker
) -> None:
    a, b = (start_master(store=db, extra=["--poll-only"]) for _ in range(2))
    start_worker(b)
    with a.client() as client:
        ids = client.submit_many([make_spec("square", [n]) for n in range(20)])
        finished = list(client.wait(ids, timeout_s=30))
    assert sorted(t.id for t in finished) == sorted(ids)
    assert all(t.state is TaskState.SUCCEEDED for t in finished)
    assert _listeners(db) == 0


def _listeners(db: str) -> int:
    """Connections to ``db`` listening for notifications."""
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
        ).fetchone()
    return row[0] if row else 0
