"""A task's end of life against real masters and workers: poison pills that
end, finished tasks deleted after their TTL (and a SQLite file that stops
growing), and the operator calls ListTasks, RetryTask and PurgeTasks."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from taskfleet.common.client import Client, make_spec
from taskfleet.common.errors import NotFound
from taskfleet.common.model import MAX_UNIX_S, TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

from procs import MasterProc, WorkerProc, poll

ROUND_TASKS = 20_000


def final(client: Client, task_id: str) -> bool:
    return client.get(task_id).state.is_final


def test_a_task_that_kills_its_worker_ends_worker_lost_and_the_queue_goes_on(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a master that tolerates two lost leases, a poison pill queued first, then work
    master = start_master(lease_s=1.0, heartbeat_s=0.3, extra=["--max-lost-leases", "2"])
    client = master.client()
    pill = client.submit("exit_with", [9], queue=queue_name)
    squares = client.submit_many(make_spec("square", [n], queue=queue_name) for n in range(5))

    # When a thread-pool worker (which the pill takes down whole) is restarted each time it dies
    runs = 0
    while not final(client, pill) and runs < 5:
        worker = start_worker(
            master,
            queues=queue_name,
            concurrency=1,
            extra=["--prefetch", "0"],
            wait_connected=False,
        )
        poll(lambda w=worker: w.popen.poll() is not None or final(client, pill), 60, "a death")
        if worker.popen.poll() is not None:
            assert worker.wait() == 9, worker.output()
            runs += 1

    # Then the pill ran three times (N + 1) and ended FAILED WorkerLost
    task = client.get(pill)
    assert runs == 3
    assert (task.state, task.lost_leases, task.attempts) == (TaskState.FAILED, 3, 3)
    assert task.error is not None and task.error.type == "WorkerLost"
    assert "lost 3 times" in task.error.message
    # and the other tasks of the queue still finish, on the worker that is left
    results = {t.id: t for t in client.wait(squares, timeout_s=60)}
    assert [results[i].state for i in squares] == [TaskState.SUCCEEDED] * 5
    failed = client.stats().queues
    assert {q.queue: q.counts[TaskState.FAILED] for q in failed}[queue_name] == 1


def test_retention_keeps_the_sqlite_file_from_growing(
    tmp_path: Path,
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a durable master that keeps finished tasks for a few seconds (long
    # enough for the test to wait for a round, short enough to prune between rounds)
    db = tmp_path / "retained.db"
    master = start_master(store=f"sqlite:{db}", extra=["--result-ttl-s", "3"])
    start_worker(master, queues=queue_name, concurrency=8)
    client = master.client()
    sizes = []
    last_ids: list[str] = []

    # When three rounds of tasks run and expire
    for _ in range(3):
        last_ids = client.submit_many(
            make_spec("square", [n], queue=queue_name) for n in range(ROUND_TASKS)
        )
        assert sum(1 for _ in client.wait(last_ids, timeout_s=120)) == ROUND_TASKS
        poll(lambda: not client.stats().queues, 60, "every finished task to be pruned")
        sizes.append(sum(p.stat().st_size for p in tmp_path.glob("retained.db*")))

    # Then the file (with its WAL) stopped growing, and an expired id is NOT_FOUND
    assert sizes[2] <= 1.5 * sizes[0], sizes
    with pytest.raises(NotFound, match="result TTL"):
        client.get(last_ids[-1])


def test_list_tasks_sees_each_task_once_across_pages_while_tasks_arrive(
    master: MasterProc, client: Client, queue_name: str
) -> None:
    # Given 10,000 queued tasks, some named differently
    specs = [
        make_spec("square" if n % 10 else "other", [n], queue=queue_name) for n in range(10_000)
    ]
    before = client.submit_many(specs)

    # When they are listed a page at a time while more arrive
    channel = grpc.insecure_channel(master.address)
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    request = tasks_pb2.ListTasksRequest(queue=queue_name, page_size=700)
    seen: list[str] = []
    pages = 0
    while True:
        page = stub.ListTasks(request, timeout=30)
        seen += [t.id for t in page.tasks]
        pages += 1
        client.submit_many(make_spec("square", [0], queue=queue_name) for _ in range(50))
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token

    # Then every task submitted before is seen once, newest first, and none after
    assert seen == before[::-1]
    assert pages == 15
    others = list(client.list_tasks(queue=queue_name, name="other", page_size=300))
    assert [t.id for t in others] == before[::10][::-1]
    pending = list(client.list_tasks(queue=queue_name, states=[TaskState.SUCCEEDED]))
    assert pending == []
    channel.close()


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": base64.urlsafe_b64encode(b"seq:-4").decode()}, "page_token"),
        ({"page_size": -1}, "page_size"),
        ({"states": [9]}, "states[0]"),
        ({"queue": "q" * 201}, "queue"),
    ],
)
def test_list_tasks_refuses_bad_requests_naming_the_field(
    master: MasterProc, request_fields: dict[str, object], field: str
) -> None:
    with grpc.insecure_channel(master.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListTasks(tasks_pb2.ListTasksRequest(**request_fields), timeout=10)  # type: ignore[arg-type]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}:")


def test_retry_runs_a_failed_task_again_and_refuses_other_states(
    master: MasterProc,
    client: Client,
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    start_worker(master, queues=queue_name)
    failed = client.submit("boom", ["first"], queue=queue_name)
    done = client.submit("square", [3], queue=queue_name)
    assert {t.id: t.state for t in client.wait([failed, done], timeout_s=30)} == {
        failed: TaskState.FAILED,
        done: TaskState.SUCCEEDED,
    }

    retried = client.retry(failed)

    assert retried.state in (TaskState.PENDING, TaskState.RUNNING)
    (again,) = client.wait([failed], timeout_s=30)
    assert (again.state, again.attempts) == (TaskState.FAILED, 2)
    with grpc.insecure_channel(master.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        for task_id, code, text in (
            (done, grpc.StatusCode.FAILED_PRECONDITION, "is SUCCEEDED"),
            ("no-such-task", grpc.StatusCode.NOT_FOUND, "no-such-task"),
            ("", grpc.StatusCode.INVALID_ARGUMENT, "task_id:"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.RetryTask(tasks_pb2.RetryTaskRequest(task_id=task_id), timeout=10)
            assert refused.value.code() is code
            assert text in (refused.value.details() or "")


def test_purge_deletes_finished_tasks_of_a_queue_and_refuses_live_states(
    master: MasterProc,
    client: Client,
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    start_worker(master, queues=queue_name)
    failed = [client.submit("boom", [str(n)], queue=queue_name) for n in range(3)]
    done = client.submit("square", [2], queue=queue_name)
    assert len(list(client.wait([*failed, done], timeout_s=30))) == 4
    waiting = client.submit("square", [2], queue=f"{queue_name}-idle")

    with grpc.insecure_channel(master.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.PurgeTasks(
                tasks_pb2.PurgeTasksRequest(states=[tasks_pb2.TASK_STATE_PENDING]), timeout=10
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("states:")

    assert client.purge(queue=queue_name, states=[TaskState.FAILED]) == 3
    for task_id in failed:
        with pytest.raises(NotFound):
            client.get(task_id)
    assert client.get(done).state is TaskState.SUCCEEDED
    assert client.get(waiting).state is TaskState.PENDING
    assert client.purge(queue=queue_name) == 1


def test_a_result_kept_past_the_year_9999_is_read_back_with_the_last_second_a_timestamp_holds(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a task submitted through the stubs alone with a result TTL of 9,000
    # years (within a Duration's range, so valid), run by a worker
    master = start_master()
    start_worker(master, queues=queue_name)
    with grpc.insecure_channel(master.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        spec = tasks_pb2.TaskSpec(
            name="square",
            queue=queue_name,
            payload=b'{"args": [7]}',
            content_type="application/json",
        )
        spec.result_ttl.FromSeconds(9_000 * 365 * 86_400)
        (task_id,) = stub.Submit(tasks_pb2.SubmitRequest(tasks=[spec]), timeout=10).task_ids

        # When it finishes and is waited for and read
        (waited,) = stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=[task_id]), timeout=30)
        read = stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), timeout=10)

    # Then both answer with its result, its expiry at 9999-12-31T23:59:59Z
    for task in (waited, read):
        assert (task.state, task.result) == (tasks_pb2.TASK_STATE_SUCCEEDED, b"49")
        assert task.expires_at.seconds == MAX_UNIX_S
