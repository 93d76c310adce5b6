"""End to end: real masters and workers on loopback, driven through the Client
(or the raw gRPC stubs where the status codes themselves are the story)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.codec import encode_args
from taskfleet.common.errors import TaskFailed
from taskfleet.common.model import Task, TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2, worker_pb2_grpc

from procs import MasterProc, WorkerProc, poll

WAIT_S = 60.0  # generous deadline for anything that should happen soon

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


# -- helpers -------------------------------------------------------------------


def wait_all(client: Client, task_ids: list[str], timeout_s: float = WAIT_S) -> dict[str, Task]:
    """Every task final (or fail), by id."""
    done = {t.id: t for t in client.wait(task_ids, timeout_s=timeout_s)}
    missing = set(task_ids) - set(done)
    assert not missing, f"{len(missing)} tasks not final within {timeout_s} s"
    return done


def counts(client: Client, queue: str) -> dict[TaskState, int]:
    """The queue's counts per state; all zero for a queue the master has never seen."""
    for q in client.stats().queues:
        if q.queue == queue:
            return dict(q.counts)
    return dict.fromkeys(TaskState, 0)


def expect_counts(client: Client, queue: str, **expected: int) -> None:
    want = {state: expected.get(state.name.lower(), 0) for state in TaskState}
    assert counts(client, queue) == want


def rpc_error(call: Callable[..., Any], request: Any) -> Any:
    """The error a unary call fails with (a grpc.Call, so it has code and details)."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=WAIT_S)
    return info.value


def stream_error(call: Callable[..., Iterable[Any]], request: Any) -> Any:
    """The error a response stream fails with once read."""
    with pytest.raises(grpc.RpcError) as info:
        list(call(request, timeout=WAIT_S))
    return info.value


def assert_status(error: Any, code: grpc.StatusCode, *mentions: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    for text in mentions:
        assert text in error.details(), (text, error.details())


def raw_spec(queue: str, **fields: Any) -> tasks_pb2.TaskSpec:
    fields.setdefault("name", "square")
    fields.setdefault("payload", encode_args([3], {}))
    fields.setdefault("content_type", "application/json")
    return tasks_pb2.TaskSpec(queue=queue, **fields)


# -- throughput and correctness ------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_thousand_tasks_across_a_thread_and_a_process_worker(
    store: str,
    start_master: StartMaster,
    start_worker: StartWorker,
    queue_name: str,
    tmp_path: Path,
) -> None:
    # Given a master and two workers with different pools on one queue
    # Leases of a minute: on a loaded machine a lapse would rightly run a task twice.
    master = start_master(
        store="memory" if store == "memory" else f"sqlite:{tmp_path}/t.db", lease_s=60
    )
    thread_worker = start_worker(master, pool="thread", concurrency=4, queues=queue_name)
    process_worker = start_worker(master, pool="process", concurrency=2, queues=queue_name)
    with master.client() as client:
        worker_ids = {w.pid: w.worker_id for w in client.stats().workers}

        # When 1,000 tasks are submitted
        task_ids = client.submit_many(
            make_spec("square", [n], queue=queue_name) for n in range(1000)
        )
        done = wait_all(client, task_ids)

        # Then each succeeded with its own result, both workers did some,
        # and the master's counts agree
        assert [done[i].state for i in task_ids] == [TaskState.SUCCEEDED] * 1000
        assert [task_result(done[i]) for i in task_ids] == [n * n for n in range(1000)]
        assert all(done[i].attempts == 1 for i in task_ids)
        ran_on = {done[i].worker_id for i in task_ids}
        assert ran_on == {worker_ids[thread_worker.pid], worker_ids[process_worker.pid]}
        expect_counts(client, queue_name, succeeded=1000)


# -- scheduling ----------------------------------------------------------------


def test_higher_priority_first_and_fifo_within_a_priority(
    master: MasterProc, start_worker: StartWorker, queue_name: str, tmp_path: Path
) -> None:
    # Given tasks of mixed priority queued while no worker is connected
    out = tmp_path / "order.txt"
    submitted = [(0, "a0"), (5, "b0"), (0, "a1"), (10, "c0"), (-1, "z0")]
    submitted += [(5, "b1"), (0, "a2"), (10, "c1"), (5, "b2"), (-1, "z1")]
    with master.client() as client:
        task_ids = client.submit_many(
            make_spec("record", [str(out), label], queue=queue_name, priority=priority)
            for priority, label in submitted
        )
        expect_counts(client, queue_name, pending=len(submitted))

        # When one worker takes them one at a time
        start_worker(
            master, pool="thread", concurrency=1, queues=queue_name, extra=["--prefetch", "0"]
        )
        wait_all(client, task_ids)

    # Then they ran by priority, oldest first within a priority
    order = out.read_text().split()
    assert order == ["c0", "c1", "b0", "b1", "b2", "a0", "a1", "a2", "z0", "z1"]


def test_delayed_task_waits_for_not_before(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker with free slots
    start_worker(master, pool="thread", concurrency=2, queues=queue_name)
    with master.client() as client:
        # When a task delayed by 1.5 s is submitted before an undelayed one
        not_before = time.time() + 1.5
        delayed = client.submit("square", [2], queue=queue_name, not_before=not_before)
        pending = client.get(delayed)
        prompt = client.submit("square", [3], queue=queue_name)
        done = wait_all(client, [delayed, prompt])

    # Then the delayed task was still waiting after being submitted, was not
    # started before its time, and the later, undelayed task ran first
    assert pending.state == TaskState.PENDING
    assert pending.spec.not_before == pytest.approx(not_before, abs=1e-3)
    assert done[delayed].state == done[prompt].state == TaskState.SUCCEEDED
    assert done[delayed].started_at >= not_before
    assert done[prompt].started_at < done[delayed].started_at
    assert task_result(done[delayed]) == 4


def test_time_limit_counts_from_the_start_not_from_prefetch(
    master: MasterProc, start_worker: StartWorker, queue_name: str, tmp_path: Path
) -> None:
    # Given a one-slot worker busy with a task held until a file appears, and a
    # task with a 1 s time limit prefetched behind it
    start_worker(master, pool="thread", concurrency=1, queues=queue_name)
    release = tmp_path / "release"
    with master.client() as client:
        held = client.submit("block_until", [str(release)], queue=queue_name)
        limited = client.submit("context", queue=queue_name, timeout_s=1.0)
        leased = poll(
            lambda: (t := client.get(limited)).state == TaskState.RUNNING and t,
            WAIT_S,
            "the limited task to be prefetched",
        )

        # When it waited for the slot longer than its time limit
        poll(lambda: time.time() > leased.started_at + 1.5, WAIT_S, "its limit to pass")
        release.touch()
        done = wait_all(client, [held, limited])

    # Then it still ran to completion: the limit counts from its own start
    assert done[limited].state == TaskState.SUCCEEDED, done[limited].error
    assert task_result(done[limited])["deadline"] > leased.started_at + 1.5


# -- retries and failures ------------------------------------------------------


def test_flaky_task_retries_then_succeeds(
    master: MasterProc, start_worker: StartWorker, queue_name: str, tmp_path: Path
) -> None:
    # Given a task that fails its first two attempts
    start_worker(master, pool="thread", concurrency=2, queues=queue_name)
    with master.client() as client:
        # When it may be attempted three times
        task_id = client.submit("flaky", [str(tmp_path), 2], queue=queue_name, max_attempts=3)
        task = wait_all(client, [task_id])[task_id]

        # Then its third attempt succeeds
        assert task.state == TaskState.SUCCEEDED
        assert task.attempts == 3
        assert task_result(task) == 3
        assert client.result(task_id, timeout_s=WAIT_S) == 3
    assert sorted(p.name for p in tmp_path.glob("attempt-*")) == [
        "attempt-1",
        "attempt-2",
        "attempt-3",
    ]


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_task_retries_only_what_it_names_and_when_it_asks(
    pool: str, master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    start_worker(master, pool=pool, concurrency=2, queues=queue_name)
    with master.client() as client:
        # An exception of retry_on runs again; any other ends the task at once,
        # though attempts remain.
        retried = client.submit("picky", ["ConnectionError"], queue=queue_name)
        ended = client.submit("picky", ["ValueError"], queue=queue_name)
        # Retry(delay_s) runs the task again no sooner than it asked.
        asked = client.submit("asks_to_retry", [1.0], queue=queue_name)
        done = wait_all(client, [retried, ended, asked])

    assert (done[retried].state, task_result(done[retried])) == (TaskState.SUCCEEDED, 2)
    assert (done[ended].state, done[ended].attempts) == (TaskState.FAILED, 1)
    assert done[ended].error is not None and done[ended].error.type == "ValueError"
    assert done[asked].state == TaskState.SUCCEEDED
    assert done[asked].attempts == 2
    first_failed_by = done[asked].created_at
    assert task_result(done[asked]) >= first_failed_by + 1.0


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_outcomes_protobuf_would_refuse_are_reported_and_the_worker_goes_on(
    pool: str, master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker with one slot
    start_worker(master, pool=pool, concurrency=1, queues=queue_name)
    with master.client() as client:
        # When a task asks to run again in 1e300 s, longer than a Duration holds,
        # one fails naming a file whose name is not UTF-8 (protobuf strings must
        # be), and one reports progress naming it
        asked = client.submit("asks_to_retry", [1e300], queue=queue_name, max_attempts=1)
        raised = client.submit("raises_undecodable", queue=queue_name, max_attempts=1)
        reported = client.submit("reports_undecodable", queue=queue_name)
        after = client.submit("square", [5], queue=queue_name)
        done = wait_all(client, [asked, raised, reported, after])

    # Then the retry fails its attempt naming the delay
    retry = done[asked]
    assert (retry.state, retry.attempts) == (TaskState.FAILED, 1)
    assert retry.error is not None and retry.error.type == "ValueError"
    assert "delay_s" in retry.error.message
    # ...the error arrives with the name escaped
    failed = done[raised]
    assert failed.state == TaskState.FAILED and failed.error is not None
    assert failed.error.message == "cannot read caf\\udce9.txt"
    assert "caf\\udce9.txt" in failed.error.traceback
    # ...and the worker runs what comes next
    assert task_result(done[reported]) == 1
    assert task_result(done[after]) == 25


def test_failing_tasks_end_failed_when_attempts_run_out(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker
    start_worker(master, pool="thread", concurrency=2, queues=queue_name)
    with master.client() as client:
        # When a task that always raises may run twice, and another that
        # always raises relies on its @task default of three attempts
        boom = client.submit("boom", ["it broke"], queue=queue_name, max_attempts=2)
        thrice = client.submit("fails_by_default_thrice", queue=queue_name)
        done = wait_all(client, [boom, thrice])

        # Then both end FAILED after all their attempts, with the last error
        failed = done[boom]
        assert failed.state == TaskState.FAILED
        assert failed.attempts == 2
        assert failed.error is not None
        assert failed.error.type == "RuntimeError"
        assert failed.error.message == "it broke"
        assert "boom" in failed.error.traceback
        assert "RuntimeError: it broke" in failed.error.traceback

        assert done[thrice].spec.max_attempts == 0  # the default came from the worker
        assert done[thrice].state == TaskState.FAILED
        assert done[thrice].attempts == 3
        assert done[thrice].error is not None
        assert done[thrice].error.message == "always"

        # And waiting for their results raises TaskFailed
        with pytest.raises(TaskFailed) as info:
            client.result(boom, timeout_s=WAIT_S)
        assert info.value.task_id == boom
        assert info.value.state == "FAILED"
        assert info.value.error_type == "RuntimeError"
        assert info.value.error_message == "it broke"
        with pytest.raises(TaskFailed):
            client.result(thrice, timeout_s=WAIT_S)
        expect_counts(client, queue_name, failed=2)


# -- current_task() ------------------------------------------------------------


@pytest.mark.parametrize("name", ["context", "async_context"])
@pytest.mark.parametrize("pool", ["thread", "process"])
def test_current_task_is_each_tasks_own(
    pool: str, name: str, master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker running four tasks at once
    worker = start_worker(master, pool=pool, concurrency=4, queues=queue_name)
    with master.client() as client:
        # When eight tasks look at their own context
        task_ids = client.submit_many(
            make_spec(name, queue=queue_name, timeout_s=30, metadata={"n": str(n)})
            for n in range(8)
        )
        done = wait_all(client, task_ids)
        if name == "async_context":  # an async task's failure keeps its traceback
            failed = client.get(client.submit("async_boom", ["no"], queue=queue_name))
            failed = wait_all(client, [failed.id])[failed.id]
            assert failed.error is not None
            assert (failed.error.type, failed.error.message) == ("RuntimeError", "no")
            assert "async_boom" in failed.error.traceback

    # Then each saw itself
    seen = []
    for n, task_id in enumerate(task_ids):
        task = done[task_id]
        assert task.state == TaskState.SUCCEEDED, task.error
        ctx = task_result(task)
        assert ctx["task_id"] == task_id
        assert ctx["name"] == name
        assert ctx["queue"] == queue_name
        assert ctx["attempt"] == 1
        assert ctx["metadata"] == {"n": str(n)}
        # The deadline is the timeout counted from about when the attempt started
        assert ctx["deadline"] == pytest.approx(task.started_at + 30, abs=5)
        seen.append(ctx)
    if pool == "thread":
        # All ran inside the worker process, in several threads, yet none
        # saw another's context
        assert {ctx["pid"] for ctx in seen} == {worker.pid}
        assert len({ctx["thread"] for ctx in seen}) > 1
    else:
        assert worker.pid not in {ctx["pid"] for ctx in seen}


# -- tasks nobody can run, cancelling, waiting ----------------------------------


def test_unregistered_task_stays_pending_until_cancelled(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker on the queue
    start_worker(master, pool="thread", concurrency=2, queues=queue_name)
    with master.client() as client:
        # When a task no worker registered is submitted ahead of known ones
        orphan = client.submit("no_such_task", [1], queue=queue_name)
        known = client.submit_many(make_spec("square", [n], queue=queue_name) for n in range(5))
        wait_all(client, known)

        # Then the known ones ran while it stayed PENDING, counted as pending
        assert client.get(orphan).state == TaskState.PENDING
        expect_counts(client, queue_name, pending=1, succeeded=5)

        # When it is cancelled
        cancelled = client.cancel(orphan)

        # Then it is CANCELLED, and a wait on it returns it at once
        assert cancelled.state == TaskState.CANCELLED
        assert cancelled.attempts == 0
        assert [t.id for t in client.wait([orphan], timeout_s=WAIT_S)] == [orphan]
        with pytest.raises(TaskFailed) as info:
            client.result(orphan, timeout_s=WAIT_S)
        assert info.value.state == "CANCELLED"
        expect_counts(client, queue_name, succeeded=5, cancelled=1)


def test_wait_streams_tasks_as_they_finish(
    master: MasterProc, start_worker: StartWorker, queue_name: str, tmp_path: Path
) -> None:
    # Given a task held RUNNING until a file appears, and a quick one
    start_worker(master, pool="thread", concurrency=3, queues=queue_name)
    release = tmp_path / "release"
    with master.client() as client:
        held = client.submit("block_until", [str(release)], queue=queue_name)
        quick = client.submit("square", [7], queue=queue_name)

        # When both are waited for
        stream = client.wait([held, quick], timeout_s=WAIT_S)

        # Then the quick one arrives while the other still runs
        first = next(stream)
        assert first.id == quick
        assert first.state == TaskState.SUCCEEDED
        poll(lambda: Path(f"{release}.started-1").exists(), WAIT_S, "block_until to start")
        assert client.get(held).state == TaskState.RUNNING

        # And the held one arrives once released, ending the stream
        release.touch()
        second = next(stream)
        assert (second.id, second.state) == (held, TaskState.SUCCEEDED)
        assert list(stream) == []

        # Given a finished task and one held forever
        forever = client.submit("block_until", [str(tmp_path / "never")], queue=queue_name)
        # When both are waited for with a timeout
        waited = list(client.wait([quick, forever], timeout_s=1.0))
        # Then the stream ends after the timeout with only the finished one
        assert [t.id for t in waited] == [quick]
        assert client.get(forever).state in (TaskState.PENDING, TaskState.RUNNING)

        # And tasks already finished come back at once
        assert [t.id for t in client.wait([held, quick], timeout_s=WAIT_S)] in (
            [held, quick],
            [quick, held],
        )
        client.cancel(forever)


# -- bad input -----------------------------------------------------------------


def test_bad_submits_and_calls_are_refused_with_status_codes(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a master with a small payload limit, and a worker
    master = start_master(extra=["--max-payload-bytes", "1000"])
    start_worker(master, pool="thread", concurrency=2, queues=queue_name)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(master.address) as channel, master.client() as client:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)

        def submit_error(*specs: tasks_pb2.TaskSpec) -> Any:
            return rpc_error(stub.Submit, tasks_pb2.SubmitRequest(tasks=specs))

        # When bad specs are submitted, they are refused naming the field
        assert_status(submit_error(raw_spec(queue_name, name="")), invalid, "tasks[0].name")
        assert_status(
            submit_error(raw_spec(queue_name, payload=b"not json")), invalid, "tasks[0].payload"
        )
        too_big = raw_spec(queue_name, payload=encode_args(["x" * 2000], {}))
        error = submit_error(too_big)
        assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "tasks[0].payload")
        assert "path" in error.details() or "URL" in error.details()
        assert_status(
            submit_error(raw_spec(queue_name, timeout=Duration(seconds=-1))),
            invalid,
            "tasks[0].timeout",
        )
        assert_status(
            submit_error(raw_spec(queue_name, max_attempts=-1)), invalid, "tasks[0].max_attempts"
        )
        assert_status(submit_error(), invalid, "tasks")

        # And a batch with one bad spec creates none of its tasks
        batch = [raw_spec(queue_name), raw_spec(queue_name), raw_spec(queue_name, name=" ")]
        assert_status(submit_error(*batch), invalid, "tasks[2].name")
        batch = [raw_spec(queue_name), too_big, raw_spec(queue_name)]
        assert_status(submit_error(*batch), grpc.StatusCode.RESOURCE_EXHAUSTED, "tasks[1].payload")

        # And reads of unknown or empty ids are refused
        unknown = "0" * 32
        assert_status(
            rpc_error(stub.GetTask, tasks_pb2.GetTaskRequest(task_id=unknown)),
            grpc.StatusCode.NOT_FOUND,
            unknown,
        )
        assert_status(
            rpc_error(stub.GetTask, tasks_pb2.GetTaskRequest(task_id="")), invalid, "task_id"
        )
        assert_status(
            stream_error(stub.WaitTasks, tasks_pb2.WaitTasksRequest(task_ids=[unknown])),
            grpc.StatusCode.NOT_FOUND,
            unknown,
        )
        assert_status(
            stream_error(stub.WaitTasks, tasks_pb2.WaitTasksRequest(task_ids=[])),
            invalid,
            "task_ids",
        )
        assert_status(
            rpc_error(stub.CancelTask, tasks_pb2.CancelTaskRequest(task_id=unknown)),
            grpc.StatusCode.NOT_FOUND,
        )

        # Then the same master still serves a normal submit, and nothing of
        # the refused batches was created
        task_id = client.submit("square", [12], queue=queue_name)
        assert client.result(task_id, timeout_s=WAIT_S) == 144
        expect_counts(client, queue_name, succeeded=1)

        # And a finished task cannot be cancelled
        assert_status(
            rpc_error(stub.CancelTask, tasks_pb2.CancelTaskRequest(task_id=task_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "SUCCEEDED",
        )
        assert client.get(task_id).state == TaskState.SUCCEEDED


def test_garbage_worker_streams_are_refused(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(master.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        # When a stream opens with something other than Hello, or with nothing,
        # or with a Hello that names no queue
        credit_first = [worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=5))]
        no_queues = worker_pb2.Hello(worker_id="garbage", hostname="h", pid=1, concurrency=2)
        errors = [
            stream_error(stub.Connect, iter(credit_first)),
            stream_error(stub.Connect, iter([])),
            stream_error(stub.Connect, iter([worker_pb2.WorkerMessage(hello=no_queues)])),
        ]

    # Then each is refused as invalid, naming what is wrong
    assert_status(errors[0], invalid, "Hello")
    assert_status(errors[1], invalid, "Hello")
    assert_status(errors[2], invalid, "hello.queues")

    # And the master keeps serving real workers and producers
    start_worker(master, pool="thread", concurrency=1, queues=queue_name)
    with master.client() as client:
        assert [w.worker_id for w in client.stats().workers if w.worker_id == "garbage"] == []
        assert client.result(client.submit("square", [5], queue=queue_name), WAIT_S) == 25
