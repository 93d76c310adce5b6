"""The worker's local pools: every job is reported through on_done exactly once,
and a task that raises, crashes, hangs or is cancelled costs its job, never the
pool."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.errors import ConfigError
from taskfleet.common.model import JSON, LeaseRef
from taskfleet.worker.execute import Job, JobResult
from taskfleet.worker.pool import Pool, make_pool
from taskfleet.worker.registry import REGISTRY

import pooltasks

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

    def __call__(self, result: JobResult) -> None:
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
            pool.submit(waiting.pop(0))
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
def registered() -> None:
    """Other tests may clear the registry; thread pools look pooltasks up in it."""
    if "pooltasks.echo" not in REGISTRY:
        importlib.reload(pooltasks)


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
    pool.submit(job)
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
    pool.submit(late)
    pool.submit(unwanted)
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
    pool.submit(job)
    marked_pid(tmp_path / "nap.pid")

    # When it is closed with wait
    pool.close(wait=True)

    # Then the job has finished and been reported, and the pool takes no more
    assert value(outcomes.next()) == 0.2
    outcomes.assert_none()
    with pytest.raises(RuntimeError):
        pool.submit(make_job("echo", 1))


def test_close_without_wait_kills_at_once(
    start_pool: Callable[..., Pool], outcomes: Outcomes, tmp_path: Path
) -> None:
    # Given a process pool running a job that never returns
    pool = start_pool("process")
    pool.submit(make_job("hang", str(tmp_path / "hang.pid")))
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


def _error(result: JobResult) -> tuple[str, str]:
    assert result.error is not None, result
    return result.error.type, result.error.message
