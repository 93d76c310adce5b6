"""The worker's local pools: every job is reported through on_done exactly once,
and a task that raises, crashes, hangs, forks, scribbles on descriptors or is
cancelled costs its job, never the pool; a pool broken by a bug of its own
makes its worker exit."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.client import task_result
from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.errors import ConfigError
from taskfleet.common.model import JSON, LeaseRef, TaskState
from taskfleet.worker.execute import Job, JobResult
from taskfleet.worker.pool import EXIT_POOL_BROKEN, Pool
from taskfleet.worker.pools import make_pool
from taskfleet.worker.registry import REGISTRY

import pooltasks
from procs import MasterProc, WorkerProc, free_port, poll

WAIT_S = 10.0
KINDS = ["process", "thread"]
_numbers = itertools.count(1)


def make_job(name: str, *args: Any, timeout_s: float = 0.0, **kwargs: Any) -> Job:
    n = next(_numbers)
    return Job(
        ref=LeaseRef(f"task-{n}", n),
        name=f"pooltasks.{name}",
        queue="pool-tests",
        attempt=2,
        payload=encode_args(args, kwargs),
        content_type=JSON,
        timeout_s=timeout_s,
        deadline=time.time() + timeout_s if timeout_s else None,
        metadata={"n": str(n)},
    )


class Outcomes:
    """The on_done of the pools under test: results to wait for, with a deadline."""

    def __init__(self) -> None:
        self._results: queue.Queue[JobResult] = queue.Queue()

    def __call__(self, results: list[JobResult]) -> None:
        for result in results:
            self._results.put(result)

    def next(self) -> JobResult:
        return self._results.get(timeout=WAIT_S)

    def assert_none(self) -> None:
        assert self._results.empty(), self._results.get_nowait()


def run_all(pool: Pool, outcomes: Outcomes, jobs: Sequence[Job]) -> dict[LeaseRef, JobResult]:
    """Submit ``jobs`` as slots free up, as the worker does; one result per job."""
    waiting = list(jobs)
    results: dict[LeaseRef, JobResult] = {}
    while len(results) < len(jobs):
        while waiting and pool.free_slots() > 0:
            pool.submit([waiting.pop(0)])
        result = outcomes.next()
        assert result.ref not in results, f"reported twice: {result}"
        results[result.ref] = result
    assert set(results) == {job.ref for job in jobs}
    return results


def run_one(pool: Pool, outcomes: Outcomes, job: Job) -> JobResult:
    return run_all(pool, outcomes, [job])[job.ref]


def value(result: JobResult) -> Any:
    assert result.ok, result.error
    return decode_result(result.result, JSON)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def marked_pid(marker: Path) -> int:
    """The pid a task left in ``marker`` once it started running."""
    wait_for(marker.exists, f"a task to start and write {marker.name}")
    return int(marker.read_text())


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    """The registry holding pooltasks alone, as a worker started with
    ``--tasks pooltasks`` has it (thread pools look tasks up in this process's
    registry, which other test modules fill too); the rest is put back after."""
    others = dict(REGISTRY)
    REGISTRY.clear()
    importlib.reload(pooltasks)
    yield
    REGISTRY.clear()
    REGISTRY.update(others)


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
def start_pool(outcomes: Outcomes) -> Iterator[Callable[..., Pool]]:
    """Starts pools serving pooltasks; abandons them at teardown."""
    pools: list[Pool] = []

    def start(kind: str, size: int = 2) -> Pool:
        pool = make_pool(kind, size, ["pooltasks"], outcomes)
        pools.append(pool)
        pool.start()
        return pool

    yield start
    for pool in pools:
        pool.close(wait=False)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """pooltasks.GATE, shut for the test and opened afterwards so no thread lingers."""
    pooltasks.GATE.clear()
    yield pooltasks.GATE
    pooltasks.GATE.set()


@pytest.mark.parametrize("kind", KINDS)
def test_results_and_errors_come_back_once_each(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a pool of two
    pool = start_pool(kind)
    echo = make_job("echo", {"a": [1, 2]})
    raising = make_job("explode", "boom")
    exiting = make_job("quit")
    unknown = make_job("nope")
    unserialisable = make_job("a_set")
    bad_payload = dataclasses.replace(make_job("echo"), payload=b"[1, 2]")

    # When the jobs run
    jobs = [echo, raising, exiting, unknown, unserialisable, bad_payload]
    results = run_all(pool, outcomes, jobs)

    # Then each comes back once, with its value or a named error
    assert value(results[echo.ref]) == {"a": [1, 2]}
    error = results[raising.ref].error
    assert error is not None
    assert (error.type, error.message) == ("ValueError", "boom")
    assert "raise ValueError(message)" in error.traceback
    assert "pooltasks.py" in error.traceback
    assert "execute.py" not in error.traceback
    assert _error(results[exiting.ref]) == ("SystemExit", "7")
    kind_, message = _error(results[unknown.ref])
    assert kind_ == "UnknownTask"
    assert "'pooltasks.nope'" in message
    assert "pooltasks.echo" in message
    assert _error(results[unserialisable.ref])[0] == "ResultNotSerializable"
    assert _error(results[bad_payload.ref])[0] == "InvalidPayload"
    assert not any(r.cancelled for r in results.values())
    assert pool.free_slots() == 2
    pool.close(wait=True)
    outcomes.assert_none()


@pytest.mark.parametrize("kind", KINDS)
def test_large_arguments_and_results_cross_whole(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given jobs whose arguments and results span many pipe reads, several in
    # flight at once, beside small ones
    pool = start_pool(kind)
    sizes = [700_000, 3, 250_000, 1, 65_536, 65_532, 900_000, 2]
    jobs = [make_job("echo", str(i) * size) for i, size in enumerate(sizes)]

    # When they run
    results = run_all(pool, outcomes, jobs)

    # Then each result is its own argument, byte for byte
    for i, (job, size) in enumerate(zip(jobs, sizes, strict=True)):
        assert value(results[job.ref]) == str(i) * size
    assert pool.free_slots() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_current_task_is_each_jobs_own(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a pool of two
    pool = start_pool(kind)

    # When several jobs ask who they are
    jobs = [make_job("whoami", timeout_s=60) for _ in range(6)]
    results = run_all(pool, outcomes, jobs)

    # Then each sees its own context
    for job in jobs:
        seen = value(results[job.ref])
        assert seen["task_id"] == job.ref.task_id
        assert seen["name"] == "pooltasks.whoami"
        assert seen["queue"] == "pool-tests"
        assert seen["attempt"] == 2
        # the time limit counts from when the job started, not from submit
        assert job.deadline is not None
        assert job.deadline <= seen["deadline"] <= time.time() + 60
        assert seen["metadata"] == job.metadata
        assert (seen["pid"] == os.getpid()) == (kind == "thread")


def test_threads_running_at_once_each_see_their_own_task(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a thread pool with 16 slots
    pool = start_pool("thread", size=16)
    pooltasks.BARRIER = threading.Barrier(16)

    # When 16 jobs run at the same time (none returns before all have started)
    jobs = [make_job("together") for _ in range(16)]
    results = run_all(pool, outcomes, jobs)

    # Then each still reports its own task id
    assert {value(results[job.ref]) for job in jobs} == {job.ref.task_id for job in jobs}
    assert all(value(results[job.ref]) == job.ref.task_id for job in jobs)


def test_a_dying_process_fails_its_job_and_is_replaced(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool of two
    pool = start_pool("process")

    # When tasks end their process with an exit code and with SIGKILL
    exits, kills = make_job("exit_hard", 3), make_job("kill_self")
    results = run_all(pool, outcomes, [exits, kills])

    # Then their jobs fail naming how, and every slot is free again
    assert _error(results[exits.ref]) == ("WorkerLost", "pool process exited with code 3")
    assert _error(results[kills.ref]) == ("WorkerLost", "pool process died with signal SIGKILL")
    assert pool.free_slots() == 2
    # And the pool runs jobs as before
    jobs = [make_job("echo", i) for i in range(4)]
    results = run_all(pool, outcomes, jobs)
    assert [value(results[job.ref]) for job in jobs] == [0, 1, 2, 3]


def test_a_job_past_its_time_limit_costs_its_process(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool of one, and the pid of its process
    pool = start_pool("process", size=1)
    before = value(run_one(pool, outcomes, make_job("whoami", timeout_s=30)))["pid"]

    # When a job runs past its time limit
    result = run_one(pool, outcomes, make_job("hang", timeout_s=0.3))

    # Then it fails naming the limit, and a fresh process runs the next job
    assert _error(result) == ("TimeLimitExceeded", "task exceeded its time limit of 0.3 s")
    assert is_gone(before)
    after = value(run_one(pool, outcomes, make_job("whoami")))["pid"]
    assert after != before


def test_cancel_kills_the_process_running_the_job(
    start_pool: Callable[..., Pool], outcomes: Outcomes, tmp_path: Path
) -> None:
    # Given a process pool running a job that never returns
    pool = start_pool("process", size=1)
    job = make_job("hang", str(tmp_path / "hang.pid"))
    pool.submit([job])
    pid = marked_pid(tmp_path / "hang.pid")

    # When it is cancelled
    assert pool.cancel(job.ref) is True

    # Then it is reported cancelled, its process is gone, and the pool runs on
    result = outcomes.next()
    assert (result.ref, result.cancelled, result.ok) == (job.ref, True, False)
    assert _error(result)[0] == "Cancelled"
    assert is_gone(pid)
    assert pool.cancel(job.ref) is False
    assert pool.cancel(LeaseRef("unknown", 1)) is False
    assert value(run_one(pool, outcomes, make_job("echo", "next"))) == "next"


def test_thread_pool_reports_limits_but_keeps_the_slot_until_return(
    start_pool: Callable[..., Pool], outcomes: Outcomes, gate: threading.Event
) -> None:
    # Given a thread pool whose two threads run jobs held at a gate
    pool = start_pool("thread")
    late, unwanted = make_job("gate", timeout_s=0.2), make_job("gate")
    pool.submit([late])
    pool.submit([unwanted])
    for _ in range(2):
        assert pooltasks.AT_GATE.acquire(timeout=WAIT_S)

    # When one passes its deadline and the other is cancelled
    assert pool.cancel(unwanted.ref) is True
    results = {r.ref: r for r in (outcomes.next(), outcomes.next())}

    # Then both are reported at once, while their threads keep the slots
    assert _error(results[late.ref])[0] == "TimeLimitExceeded"
    assert results[unwanted.ref].cancelled
    assert pool.free_slots() == 0
    # And once the functions return, the slots free up and their results are dropped
    gate.set()
    wait_for(lambda: pool.free_slots() == 2, "the slots to free up")
    pool.close(wait=True)
    outcomes.assert_none()


@pytest.mark.parametrize("kind", KINDS)
def test_close_with_wait_lets_a_running_job_finish(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes, tmp_path: Path
) -> None:
    # Given a pool running a job
    pool = start_pool(kind)
    job = make_job("nap", 0.2, str(tmp_path / "nap.pid"))
    pool.submit([job])
    marked_pid(tmp_path / "nap.pid")

    # When it is closed with wait
    pool.close(wait=True)

    # Then the job has finished and been reported, and the pool takes no more
    assert value(outcomes.next()) == 0.2
    outcomes.assert_none()
    with pytest.raises(RuntimeError):
        pool.submit([make_job("echo", 1)])


def test_close_without_wait_kills_at_once(
    start_pool: Callable[..., Pool], outcomes: Outcomes, tmp_path: Path
) -> None:
    # Given a process pool running a job that never returns
    pool = start_pool("process")
    pool.submit([make_job("hang", str(tmp_path / "hang.pid"))])
    pid = marked_pid(tmp_path / "hang.pid")

    # When it is closed without waiting
    pool.close(wait=False)

    # Then its process is gone and nothing is reported
    assert is_gone(pid)
    outcomes.assert_none()


@pytest.mark.parametrize("kind", KINDS)
def test_a_task_module_that_cannot_be_imported_fails_start(kind: str, outcomes: Outcomes) -> None:
    pool = make_pool(kind, 1, ["pooltasks_missing"], outcomes)
    with pytest.raises(ConfigError, match="pooltasks_missing"):
        pool.start()
    pool.close(wait=False)


def test_make_pool_refuses_an_unknown_kind(outcomes: Outcomes) -> None:
    with pytest.raises(ConfigError, match="--pool"):
        make_pool("fiber", 1, [], outcomes)


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_pools_own_code_cannot_encode_fails_the_attempt_with_its_cause(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a pool of two
    pool = start_pool(kind)

    # When tasks return values the encoder chokes on, or raise exceptions that
    # cannot be printed or pickled
    too_deep, refuses = make_job("nested", 100_000), make_job("unencodable")
    unprintable, unpicklable = make_job("raise_unprintable"), make_job("raise_unpicklable")
    results = run_all(pool, outcomes, [too_deep, refuses, unprintable, unpicklable])

    # Then each attempt fails with the real cause, and every slot is free again
    kind_, message = _error(results[too_deep.ref])
    assert kind_ == "ResultNotSerializable"
    assert "recursion" in message
    kind_, message = _error(results[refuses.ref])
    assert kind_ == "ResultNotSerializable"
    assert "LookupError" in message
    kind_, message = _error(results[unprintable.ref])
    assert kind_ == "UnprintableError"
    assert "__str__ raised RuntimeError" in message
    assert _error(results[unpicklable.ref]) == ("UnpicklableError", "holds a lock")
    assert pool.free_slots() == 2
    # And the pool runs jobs as before
    jobs = [make_job("echo", i) for i in range(4)]
    results = run_all(pool, outcomes, jobs)
    assert [value(results[job.ref]) for job in jobs] == [0, 1, 2, 3]
    pool.close(wait=True)
    outcomes.assert_none()


@pytest.mark.parametrize("kind", KINDS)
def test_a_forked_child_leaving_the_task_exits_at_once(
    kind: str, start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a pool of one
    pool = start_pool(kind, size=1)

    # When tasks fork, and the child leaves the task by returning or by raising
    returns, raises = make_job("fork"), make_job("fork", True)
    results = run_all(pool, outcomes, [returns, raises])

    # Then only the parent reports, and each child ended in the pool's own exit
    # (0 after a return, 1 after a raise) without running any pool code
    assert value(results[returns.ref]) == {"who": "parent", "child_exit": 0}
    assert value(results[raises.ref]) == {"who": "parent", "child_exit": 1}
    # And the pool runs jobs as before, with nothing reported twice
    jobs = [make_job("echo", i) for i in range(3)]
    results = run_all(pool, outcomes, jobs)
    assert [value(results[job.ref]) for job in jobs] == [0, 1, 2]
    assert pool.free_slots() == 1
    pool.close(wait=True)
    outcomes.assert_none()
    assert pool.failure is None


def test_junk_on_low_descriptors_never_reaches_the_pool(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool of one and the pid of its process
    pool = start_pool("process", size=1)
    before = value(run_one(pool, outcomes, make_job("whoami")))["pid"]

    # When a task writes junk to every descriptor from 3 to 63
    result = run_one(pool, outcomes, make_job("scribble", 63))

    # Then the task succeeds, and the same process runs the next job
    assert value(result) == "scribbled"
    assert value(run_one(pool, outcomes, make_job("whoami")))["pid"] == before
    assert pool.failure is None


def test_junk_on_the_pools_own_channel_costs_only_that_process(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool of two
    pool = start_pool("process")

    # When a task writes junk to every descriptor it may have, the pool's channel too
    highest_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    scribbler = make_job("scribble", highest_fd)
    results = run_all(pool, outcomes, [scribbler, make_job("echo", "beside")])

    # Then its attempt fails naming what happened
    kind_, message = _error(results[scribbler.ref])
    assert kind_ == "WorkerLost"
    assert "malformed" in message
    # And the pool runs jobs as before, in fresh processes where need be
    jobs = [make_job("echo", i) for i in range(4)]
    results = run_all(pool, outcomes, jobs)
    assert [value(results[job.ref]) for job in jobs] == [0, 1, 2, 3]
    assert pool.free_slots() == 2
    assert pool.failure is None


def test_a_process_that_closes_the_pools_channel_and_runs_on_is_killed(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool of one
    pool = start_pool("process", size=1)

    # When a task closes every descriptor it has, the pool's channel too, and runs on
    highest_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    result = run_one(pool, outcomes, make_job("close_all_and_hang", highest_fd))

    # Then its attempt fails naming what happened, and a fresh process runs the next job
    kind_, message = _error(result)
    assert kind_ == "WorkerLost"
    assert "closed its channel to the pool without exiting" in message
    assert value(run_one(pool, outcomes, make_job("echo", "next"))) == "next"
    assert pool.failure is None


# -- on real workers ------------------------------------------------------------------


def test_tasks_that_fork_or_scribble_cost_a_real_worker_only_their_attempt(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a worker with a process pool of one
    master = start_master()
    start_worker(
        master, tasks="e2etasks,pooltasks", queues=queue_name, pool="process", concurrency=1
    )
    highest_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1  # the worker's limit too

    with master.client() as client:
        # When a task that writes junk to every descriptor runs twice (a poison
        # pill, tried again), beside tasks that fork and that scribble on low ones
        def submit(name: str, *args: Any, **options: Any) -> str:
            return client.submit(name, args, queue=queue_name, **options)

        scribbler = submit("pooltasks.scribble", highest_fd, max_attempts=2)
        forker = submit("pooltasks.fork")
        low = submit("pooltasks.scribble", 63)
        squares = [submit("square", n) for n in range(5)]
        task_ids = [scribbler, forker, low, *squares]
        done = {t.id: t for t in client.wait(task_ids, timeout_s=60)}

    # Then the scribbler fails both attempts naming what happened, and every other
    # task completes on the same worker
    assert set(done) == set(task_ids)
    failed = done[scribbler]
    assert (failed.state, failed.attempts) == (TaskState.FAILED, 2)
    assert failed.error is not None
    assert failed.error.type == "WorkerLost"
    assert "malformed" in failed.error.message
    assert task_result(done[forker]) == {"who": "parent", "child_exit": 0}
    assert task_result(done[low]) == "scribbled"
    assert [task_result(done[i]) for i in squares] == [n * n for n in range(5)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_whose_pool_breaks_exits_and_its_leases_lapse(
    kind: str,
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a worker serving, whose pool's own code raises on a break_pool job
    master = start_master()
    worker = start_worker(
        master, tasks="e2etasks,poolsaboteur", queues=queue_name, pool=kind, concurrency=1
    )
    with master.client() as client:
        assert client.run("square", [3], queue=queue_name, timeout_s=WAIT_S) == 9

        # When it is handed a break_pool job
        broken = client.submit("break_pool", queue=queue_name)

        # Then it says why and exits with its own code, rather than heartbeating on
        assert worker.wait(timeout_s=30) == EXIT_POOL_BROKEN
        assert "the pool is broken" in worker.output()
        assert "sabotaged by poolsaboteur" in worker.output()
        # And the task's lease lapses on the master: the task is handed out again
        poll(lambda: client.get(broken).state == TaskState.PENDING, 30, "the lease to lapse")
        assert client.get(broken).attempts == 1


def test_a_manager_worker_whose_pool_breaks_exits(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
) -> None:
    # Given a worker serving a master's classic queues, whose pool's own code
    # raises on a break_pool job
    port = free_port()
    flags = ["--authkey", "abc", "--manager-task"]
    start_master(extra=["--manager-listen", f"127.0.0.1:{port}", *flags, "square"])
    worker = start_worker(
        f"127.0.0.1:{port}",
        tasks="e2etasks,poolsaboteur",
        extra=["--transport", "manager", *flags, "break_pool"],
        wait_connected=False,
    )

    # When a classic client puts an item on the task queue
    manager = _ClassicClient(address=("127.0.0.1", port), authkey=b"abc")
    manager.connect()
    manager.get_task_queue().put(3)  # type: ignore[attr-defined]

    # Then the worker says why and exits with its own code, rather than running on
    assert worker.wait(timeout_s=30) == EXIT_POOL_BROKEN
    assert "the pool is broken" in worker.output()


class _ClassicClient(BaseManager):
    pass


_ClassicClient.register("get_task_queue")


def _error(result: JobResult) -> tuple[str, str]:
    assert result.error is not None, result
    return result.error.type, result.error.message


def test_worker_modules_import_no_cycle() -> None:
    """``pool`` is the interface the implementations import; the factory that
    imports them lives where nothing imports it back. Imports inside functions
    count: they only hide a cycle."""
    import ast
    from pathlib import Path

    import taskfleet.worker

    package = Path(taskfleet.worker.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[path.stem] = {
            n.rpartition(".")[2] for n in names if n.startswith("taskfleet.worker.")
        }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, set()) - seen:
            seen.add(name)
            if name == goal or reaches(name, goal, seen):
                return True
        return False

    cycles = sorted(module for module in graph if reaches(module, module, set()))
    assert not cycles, f"import cycles through {cycles}"


def test_short_tasks_are_pipelined_about_a_millisecond_deep() -> None:
    # The depth follows the average run time of a job: a process holds enough
    # no-ops to keep busy between the supervisor's wake-ups, a few short tasks,
    # and one task at a time once they take SHORT_JOB_S (no job behind a long one).
    from taskfleet.worker.process_pool import (
        MAX_PIPELINE_DEPTH,
        PIPELINE_AHEAD_S,
        SHORT_JOB_S,
        ProcessPool,
    )

    pool = ProcessPool(2, [], lambda results: None)
    try:
        depths = {}
        for job_s in (0.0, 0.00005, PIPELINE_AHEAD_S / 4, PIPELINE_AHEAD_S, SHORT_JOB_S, 1.0):
            pool._job_s = job_s
            depths[job_s] = pool._depth()
            assert pool.free_slots() == 2 * depths[job_s]
    finally:
        pool.close(wait=False)
    assert depths[0.0] == depths[0.00005] == MAX_PIPELINE_DEPTH
    assert depths[PIPELINE_AHEAD_S / 4] == 5
    assert depths[PIPELINE_AHEAD_S] == 2
    assert depths[SHORT_JOB_S] == depths[1.0] == 1


def test_a_wake_up_sent_while_the_supervisor_reads_its_wake_ups_is_not_lost(
    start_pool: Callable[..., Pool], outcomes: Outcomes
) -> None:
    # Given a process pool whose supervisor, as it reads its wake-up socket, sees
    # another thread submit a job (the race, made to happen every time)
    from taskfleet.worker.process_pool import ProcessPool

    pool = start_pool("process")
    assert isinstance(pool, ProcessPool)
    wake_r = pool._wake_r
    raced: list[Job] = []

    class RacingSocket:
        def fileno(self) -> int:
            return wake_r.fileno()

        def recv(self, size: int) -> bytes:
            if not raced:
                raced.append(make_job("echo", "raced"))
                submitter = threading.Thread(target=pool.submit, args=([raced[0]],))
                submitter.start()
                submitter.join()
            return wake_r.recv(size)

        def close(self) -> None:
            wake_r.close()

    pool._wake_r = RacingSocket()  # type: ignore[assignment]
    pool.submit([make_job("echo", "first")])
    assert {value(outcomes.next()), value(outcomes.next())} == {"first", "raced"}

    # When the next job comes with the supervisor idle
    pool.submit([make_job("echo", "later")])

    # Then it wakes the supervisor and runs
    assert value(outcomes.next()) == "later"


def test_the_ledger_reports_what_it_is_given_in_one_call_each_job_once() -> None:
    from taskfleet.worker.pool import JobLedger, cancelled

    # Given a ledger holding four jobs, the last claimed by a cancel
    calls: list[list[JobResult]] = []
    ledger = JobLedger(calls.append)
    jobs = [make_job("echo", i) for i in range(4)]
    ledger.add(jobs)
    a, b, c, claimed = (job.ref for job in jobs)
    assert ledger.cancel(claimed)

    # When results come for all of them at once, one twice, with one for a job
    # it never held
    ledger.finish([JobResult(ref, ok=True) for ref in (a, b, a, c, claimed, LeaseRef("x", 1))])

    # Then one call reports the three unclaimed jobs, once each
    assert [[result.ref for result in call] for call in calls] == [[a, b, c]]
    # And only the cancel's own report ends the claimed job, once
    ledger.finish([JobResult(a, ok=True), cancelled(claimed)])
    ledger.finish([cancelled(claimed)])
    assert [[result.ref for result in call] for call in calls[1:]] == [[claimed]]
    assert calls[1][0].cancelled and len(ledger) == 0


def test_results_read_in_one_wake_up_are_reported_in_one_call(tmp_path: Path) -> None:
    # Given a one-process pool that pipelines eight short jobs into its process at
    # once (submitted from on_done, so the supervisor's next pass sends them all),
    # the last of which leaves a marker once the seven before it have reported
    from taskfleet.worker.process_pool import MAX_PIPELINE_DEPTH, ProcessPool

    marker = tmp_path / "last-started"
    jobs = [make_job("echo", i) for i in range(MAX_PIPELINE_DEPTH - 1)]
    jobs.append(make_job("nap", 0, str(marker)))
    calls: list[list[JobResult]] = []
    all_done = threading.Event()

    def on_done(results: list[JobResult]) -> None:
        calls.append(results)
        if len(calls) == 1:  # the warm-up job
            pool._job_s = 0.0  # as after many no-ops: pipelined the deepest
            pool.submit(jobs)
        elif len(calls) == 2:
            # When the supervisor, busy reporting the first of them, falls behind
            # until the process has sent the results of all seven echoes
            wait_for(marker.exists, "the last job to start")
        if sum(map(len, calls)) == len(jobs) + 1:
            all_done.set()

    pool = ProcessPool(1, ["pooltasks"], on_done)
    try:
        pool.start()
        pool.submit([make_job("echo", "warm-up")])
        assert all_done.wait(WAIT_S)
    finally:
        pool.close(wait=False)

    # Then the results waiting for it come in one call (the last job's may follow
    # in another), not one call each
    reported = [result.ref for call in calls[1:] for result in call]
    assert sorted(reported, key=str) == sorted((job.ref for job in jobs), key=str)
    assert len(calls) <= 4, [len(call) for call in calls]
