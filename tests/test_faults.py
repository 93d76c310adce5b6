"""Real faults against real processes: workers and masters killed or stopped
mid-flight, masters restarted on the same SQLite file and port.

Masters run with a 2 s lease and 0.5 s heartbeats (the MasterProc defaults),
so a dead worker's tasks come back within a few seconds. Every wait is a
Client.wait or a poll with a deadline.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import pytest

from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.model import Task, TaskState
from taskfleet.common.shutdown import EXIT_FORCED
from taskfleet.master.store import SqliteStore

from procs import Gates, MasterProc, WorkerProc, alive, free_port, poll

WAIT_S = 30.0

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


# -- helpers -------------------------------------------------------------------


def finished(client: Client, task_ids: Sequence[str], timeout_s: float = WAIT_S) -> dict[str, Task]:
    """Every task once final; fails naming how many were not final in time."""
    done = {task.id: task for task in client.wait(task_ids, timeout_s)}
    missing = set(task_ids) - done.keys()
    assert not missing, f"{len(missing)} of {len(task_ids)} tasks not final within {timeout_s} s"
    return done


def counts(client: Client, queue: str) -> dict[TaskState, int]:
    for queue_counts in client.stats().queues:
        if queue_counts.queue == queue:
            return queue_counts.counts
    return dict.fromkeys(TaskState, 0)


def worker_id(client: Client, worker: WorkerProc) -> str:
    """The id under which ``worker`` is connected to the master ``client`` talks to."""

    def connected_id() -> str | None:
        return next((w.worker_id for w in client.stats().workers if w.pid == worker.pid), None)

    return poll(connected_id, WAIT_S, f"worker {worker.pid} in stats")


def submit_squares(client: Client, queue: str, numbers: range) -> list[str]:
    return client.submit_many(make_spec("square", [n], queue=queue) for n in numbers)


def assert_squares(done: dict[str, Task], task_ids: list[str], numbers: range) -> None:
    assert [done[i].state for i in task_ids] == [TaskState.SUCCEEDED] * len(task_ids)
    assert [task_result(done[i]) for i in task_ids] == [n * n for n in numbers]


def sqlite_master(start_master: StartMaster, db: Path, port: int | None = None) -> MasterProc:
    return start_master(store=f"sqlite:{db}", port=port)


# -- a worker dies -------------------------------------------------------------


def test_task_of_sigkilled_worker_runs_again_on_another_worker(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given worker A running a task that blocks until its gate opens
    worker_a = start_worker(master, queues=queue_name, pool="thread")
    gate = gates.new("held")
    task_id = client.submit("block_until", [gate], queue=queue_name)
    first = poll(lambda: gates.started(gate, 1), WAIT_S, "attempt 1 to start")
    assert first == worker_a.pid

    # When A is SIGKILLed and worker B starts
    worker_a.kill()
    worker_b = start_worker(master, queues=queue_name, pool="thread")
    b_id = worker_id(client, worker_b)

    # Then the lease lapses, the reaper hands the task to B as attempt 2...
    second = poll(lambda: gates.started(gate, 2), WAIT_S, "attempt 2 to start")
    assert second == worker_b.pid

    # ...and once released it succeeds there
    gates.open(gate)
    task = finished(client, [task_id])[task_id]
    assert task.state == TaskState.SUCCEEDED
    assert task_result(task) == "released"
    assert task.attempts == 2
    assert task.worker_id == b_id


# -- a master restarts on the same file ------------------------------------------


def test_pending_tasks_survive_master_sigterm_and_restart(
    start_master: StartMaster, start_worker: StartWorker, tmp_path: Path, queue_name: str
) -> None:
    # Given 200 tasks submitted to a SQLite master with no worker
    db = tmp_path / "m.db"
    first = sqlite_master(start_master, db)
    numbers = range(200)
    with first.client() as client:
        task_ids = submit_squares(client, queue_name, numbers)

    # When it is stopped with SIGTERM and a new master starts on the same port and file
    assert first.stop() == 0
    second = sqlite_master(start_master, db, port=first.port)

    with second.client() as client:
        # Then every task is still there, PENDING and untouched
        assert counts(client, queue_name)[TaskState.PENDING] == 200
        tasks = [client.get(i) for i in task_ids]
        assert {(t.state, t.attempts) for t in tasks} == {(TaskState.PENDING, 0)}

        # And a worker runs them all with the right results
        start_worker(second, queues=queue_name, pool="thread", concurrency=4)
        assert_squares(finished(client, task_ids), task_ids, numbers)


@pytest.mark.parametrize("lease_lapses_meanwhile", [False, True], ids=["quick", "lease-lapsed"])
def test_busy_worker_reconnects_by_itself_to_master_restarted_after_kill_9(
    start_master: StartMaster,
    start_worker: StartWorker,
    tmp_path: Path,
    queue_name: str,
    gates: Gates,
    lease_lapses_meanwhile: bool,
) -> None:
    # Given a worker with one slot and no prefetch, busy with a blocking task,
    # and 200 tasks queued behind it on a SQLite master
    db = tmp_path / "m.db"
    first = sqlite_master(start_master, db)
    worker = start_worker(
        first, queues=queue_name, pool="thread", concurrency=1, extra=["--prefetch", "0"]
    )
    gate = gates.new("busy")
    numbers = range(200)
    with first.client() as client:
        blocker = client.submit("block_until", [gate], queue=queue_name)
        poll(lambda: gates.started(gate, 1), WAIT_S, "the blocking task to start")
        task_ids = submit_squares(client, queue_name, numbers)
        assert counts(client, queue_name)[TaskState.PENDING] == 200

    # When the master is killed with SIGKILL
    first.kill()

    # Then the file holds all 200 tasks, still PENDING (read while no master runs)
    store = SqliteStore(str(db))
    try:
        assert [t.state for t in store.get_many(task_ids)] == [TaskState.PENDING] * 200
        assert store.get(blocker).state == TaskState.RUNNING
    finally:
        store.close()
    if lease_lapses_meanwhile:
        # A master the worker cannot reach (another port) takes the blocking
        # task back once its lease lapses, as a master restarted too late would.
        interim = sqlite_master(start_master, db)
        with interim.client() as client:
            poll(lambda: client.get(blocker).state == TaskState.PENDING, WAIT_S, "the reaper")
        assert interim.stop() == 0

    # And when a new master starts on the same port and file, the same worker
    # process (never restarted) reconnects to it by itself and runs everything
    second = sqlite_master(start_master, db, port=first.port)
    worker.wait_connected()
    gates.open(gate)
    with second.client() as client:
        done = finished(client, [blocker, *task_ids])
        assert_squares(done, task_ids, numbers)
        assert task_result(done[blocker]) == "released"
        assert {t.worker_id for t in done.values()} == {worker_id(client, worker)}
    if lease_lapses_meanwhile:
        # the worker was told to drop attempt 1 (revoked) and ran attempt 2
        assert done[blocker].attempts == 2
        assert gates.started(gate, 2)
    assert worker.popen.poll() is None


def test_worker_keeps_serving_across_a_master_restart(
    start_master: StartMaster,
    start_worker: StartWorker,
    tmp_path: Path,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a worker that has done some tasks for a SQLite master and is running one more
    db = tmp_path / "m.db"
    first = sqlite_master(start_master, db)
    worker = start_worker(first, queues=queue_name, pool="thread")
    gate = gates.new("across")
    with first.client() as client:
        before = submit_squares(client, queue_name, range(20))
        assert_squares(finished(client, before), before, range(20))
        the_worker_id = worker_id(client, worker)
        running = client.submit("block_until", [gate], queue=queue_name)
        poll(lambda: gates.started(gate, 1), WAIT_S, "the blocking task to start")

    # When the master is stopped with SIGTERM, the running task is released
    # while no master runs, and the master is restarted on the same port and file
    assert first.stop() == 0
    gates.open(gate)
    second = sqlite_master(start_master, db, port=first.port)

    # Then the same worker process reconnects under the same id, reports the
    # task that ran across the restart, and runs tasks submitted afterwards
    with second.client() as client:
        assert worker_id(client, worker) == the_worker_id
        after = submit_squares(client, queue_name, range(20, 40))
        done = finished(client, [running, *after])
        assert_squares(done, after, range(20, 40))
        assert task_result(done[running]) == "released"
        assert {t.worker_id for t in done.values()} == {the_worker_id}
        # and what finished before the restart is still there
        assert_squares(finished(client, before), before, range(20))
    assert worker.popen.poll() is None


# -- a worker is told to stop -------------------------------------------------------


def test_sigterm_drains_worker_running_tasks_finish_queued_ones_stay(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a process-pool worker with 2 slots and 1 prefetch, with 5 blocking
    # tasks: 2 running, 1 prefetched, 2 still queued
    worker = start_worker(master, queues=queue_name, pool="process", concurrency=2)
    all_gates = [gates.new(f"g{i}") for i in range(5)]
    task_ids = client.submit_many(
        make_spec("block_until", [g], queue=queue_name) for g in all_gates
    )
    poll(
        lambda: sum(bool(gates.started(g, 1)) for g in all_gates) == 2,
        WAIT_S,
        "two tasks to start",
    )
    poll(lambda: counts(client, queue_name)[TaskState.RUNNING] == 3, WAIT_S, "the prefetch")
    running = [g for g in all_gates if gates.started(g, 1)]
    queued = [g for g in all_gates if g not in running]

    # When it gets SIGTERM
    worker.signal(signal.SIGTERM)

    # Then it hands back its prefetched task and takes no new ones
    poll(
        lambda: counts(client, queue_name)[TaskState.PENDING] == 3,
        WAIT_S,
        "the prefetched task to be handed back",
    )
    assert worker.popen.poll() is None

    # And when the running tasks are released, they finish and the worker exits 0
    gates.open(*running)
    assert worker.wait(WAIT_S) == 0
    tasks = {t.id: t for t in (client.get(i) for i in task_ids)}
    by_gate = dict(zip(all_gates, task_ids, strict=True))
    assert [tasks[by_gate[g]].state for g in running] == [TaskState.SUCCEEDED] * 2
    assert [(tasks[by_gate[g]].state, tasks[by_gate[g]].attempts) for g in queued] == [
        (TaskState.PENDING, 0)
    ] * 3
    assert not any(gates.started(g, 1) for g in queued)


def test_second_sigterm_exits_at_once_and_tasks_return_by_lease_expiry(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a process-pool worker A running two blocking tasks
    worker_a = start_worker(master, queues=queue_name, pool="process", concurrency=2)
    held = [gates.new(f"h{i}") for i in range(2)]
    task_ids = client.submit_many(make_spec("block_until", [g], queue=queue_name) for g in held)
    poll(lambda: all(gates.started(g, 1) for g in held), WAIT_S, "both tasks to start")

    # When it gets SIGTERM, starts draining, and gets a second SIGTERM
    worker_a.signal(signal.SIGTERM)
    poll(lambda: "draining" in worker_a.output(), WAIT_S, "the drain to begin")
    worker_a.signal(signal.SIGTERM)

    # Then it exits at once with EXIT_FORCED, its tasks still unreleased, and
    # takes its pool processes with it (no orphans running tasks unsupervised)
    assert worker_a.wait(WAIT_S) == EXIT_FORCED
    assert not any(Path(g).exists() for g in held)
    pool_pids = {pid for g in held if (pid := gates.started(g, 1))}
    assert worker_a.pid not in pool_pids
    poll(lambda: not any(map(alive, pool_pids)), WAIT_S, "the pool processes to be gone")

    # And the tasks come back through lease expiry and run on worker B
    worker_b = start_worker(master, queues=queue_name, pool="thread")
    b_id = worker_id(client, worker_b)
    poll(lambda: all(gates.started(g, 2) for g in held), WAIT_S, "attempt 2 on worker B")
    gates.open(*held)
    done = finished(client, task_ids)
    assert [(t.state, t.attempts, t.worker_id) for t in done.values()] == [
        (TaskState.SUCCEEDED, 2, b_id)
    ] * 2


# -- a master is told to stop ---------------------------------------------------------


def test_master_sigterm_with_connected_workers_leaves_a_consistent_file(
    start_master: StartMaster,
    start_worker: StartWorker,
    tmp_path: Path,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a SQLite master with two connected workers: 30 tasks done, 2 running,
    # and 10 queued on a queue nobody serves
    db = tmp_path / "m.db"
    master = sqlite_master(start_master, db)
    for _ in range(2):
        start_worker(master, queues=queue_name, pool="thread")
    idle_queue = f"{queue_name}-idle"
    held = [gates.new(f"h{i}") for i in range(2)]
    with master.client() as client:
        done_ids = submit_squares(client, queue_name, range(30))
        assert_squares(finished(client, done_ids), done_ids, range(30))
        running_ids = client.submit_many(
            make_spec("block_until", [g], queue=queue_name) for g in held
        )
        poll(lambda: all(gates.started(g, 1) for g in held), WAIT_S, "the blocking tasks")
        queued_ids = submit_squares(client, idle_queue, range(10))

    # When it is stopped with SIGTERM
    assert master.stop() == 0

    # Then the file opens cleanly and holds exactly what was submitted, in the
    # states the master last acknowledged, with counts that match the rows
    with closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = SqliteStore(str(db))
    try:
        by_queue = {q.queue: q.counts for q in store.stats()}
        assert by_queue[queue_name][TaskState.SUCCEEDED] == 30
        assert by_queue[queue_name][TaskState.RUNNING] == 2
        assert by_queue[idle_queue][TaskState.PENDING] == 10
        assert sum(sum(c.values()) for c in by_queue.values()) == 42
        assert_squares({t.id: t for t in store.get_many(done_ids)}, done_ids, range(30))
        assert {t.state for t in store.get_many(running_ids)} == {TaskState.RUNNING}
        assert {t.state for t in store.get_many(queued_ids)} == {TaskState.PENDING}
    finally:
        store.close()


def test_master_second_sigterm_while_draining_exits_at_once(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str, gates: Gates
) -> None:
    # Given a master that drains for a long while, waiting on a worker's running task
    master = start_master(extra=["--drain-s", "600"])
    start_worker(master, queues=queue_name, pool="thread")
    gate = gates.new("h")
    with master.client() as client:
        client.submit("block_until", [gate], queue=queue_name)
    poll(lambda: gates.started(gate, 1), WAIT_S, "the task to start")

    # When it gets SIGTERM, starts shutting down, and gets a second SIGTERM
    master.signal(signal.SIGTERM)
    poll(lambda: "shutting down" in master.output(), WAIT_S, "the shutdown to begin")
    master.signal(signal.SIGTERM)

    # Then it exits at once with EXIT_FORCED instead of draining on
    assert master.wait(WAIT_S) == EXIT_FORCED
    assert "second signal: exiting at once" in master.output()
    gates.open(gate)


# -- tasks a worker cannot run ----------------------------------------------------------


def test_master_never_hands_a_worker_a_task_name_it_does_not_know(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker serving queue Q with the e2etasks module
    worker = start_worker(master, queues=queue_name, pool="thread")
    info = next(w for w in client.stats().workers if w.pid == worker.pid)
    assert "square" in info.task_names
    assert "no_such_task" not in info.task_names

    # When a task it does not know is queued on Q ahead of one it knows
    unknown = client.submit("no_such_task", [1], queue=queue_name)
    known = client.submit("square", [7], queue=queue_name)

    # Then it runs the one it knows, and the other stays PENDING, never leased
    assert task_result(finished(client, [known])[known]) == 49
    task = client.get(unknown)
    assert (task.state, task.attempts, task.worker_id) == (TaskState.PENDING, 0, "")


def test_a_second_master_on_the_same_sqlite_file_is_refused(
    start_master: StartMaster, tmp_path: Path, queue_name: str
) -> None:
    # Given a master serving a SQLite file, with a task in it
    db = tmp_path / "shared.db"
    first = sqlite_master(start_master, db)
    with first.client() as client:
        task_id = client.submit("square", [3], queue=queue_name)

    # When a second master is started on the same file
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskfleet.master",
            "--store",
            f"sqlite:{db}",
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Then it exits at once with one line naming the file, and the first serves on
    assert second.returncode == 2, second.stderr
    assert "in use by another master" in second.stderr and str(db) in second.stderr
    assert "Traceback" not in second.stderr
    with first.client() as client:
        assert client.get(task_id).state == TaskState.PENDING
