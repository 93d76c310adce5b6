"""Size limits and batches cut by bytes, on real masters and workers: results,
errors, assignments, submits and metadata, up to and past the gRPC message limit."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import grpc
import pytest

from taskfleet.common.batching import BATCH_BYTES, MAX_ITEM_BYTES, cut
from taskfleet.common.channel import MAX_MESSAGE_BYTES
from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.config import DEFAULT_MAX_RESULT_BYTES
from taskfleet.common.errors import ResourceExhausted
from taskfleet.common.model import LeaseRef, Outcome, Task, TaskError, TaskState
from taskfleet.common.result_limit import limit_outcome
from taskfleet.v1 import tasks_pb2, worker_pb2

from procs import Gates, MasterProc, WorkerProc, free_port, poll
from proxy import FaultyProxy
from test_protocol import HandWorker

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]
WAIT_S = 45.0


def final(client: Client, task_ids: list[str], timeout_s: float = WAIT_S) -> dict[str, Task]:
    done = {t.id: t for t in client.wait(task_ids, timeout_s=timeout_s)}
    assert set(done) == set(task_ids), f"{len(task_ids) - len(done)} tasks not final in time"
    return done


def tasks_run(metrics_address: str, name: str) -> int:
    """How many attempts of task ``name`` the worker serving ``metrics_address`` finished."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = "taskfleet_worker_tasks_run_total{"
    return sum(
        int(float(line.rpartition(" ")[2]))
        for line in text.splitlines()
        if line.startswith(prefix) and f'task="{name}"' in line
    )


# -- the helper ------------------------------------------------------------------


def test_cut_splits_by_count_and_by_bytes_and_sends_a_large_item_alone() -> None:
    sizes = [1, 2, 3, 10, 1, 1, 1, 1]

    batches = list(cut(sizes, lambda n: n, max_count=3, max_bytes=5))

    assert batches == [[1, 2], [3], [10], [1, 1, 1], [1]]


def test_a_cut_error_is_within_the_limit_and_is_not_cut_again() -> None:
    error = TaskError("ValueError", "é" * 5000, "Traceback\n" + "frame\n" * 3000 + "ValueError")
    failed = Outcome(LeaseRef("t", 1), TaskState.FAILED, error=error, max_attempts=3)

    once = limit_outcome(failed, 4000)
    twice = limit_outcome(once, 4000)

    assert once.error is not None and once.error.type == "ValueError"
    assert len(once.error.message.encode()) + len(once.error.traceback.encode()) <= 4000
    assert once.error.traceback.startswith("Traceback") and once.error.traceback.endswith("Error")
    assert once.max_attempts == 3  # the failure is the task's own: retried as it would be
    assert twice == once


# -- results ---------------------------------------------------------------------


def test_results_adding_up_past_the_message_limit_are_cut_and_all_get_through(
    start_master: StartMaster, start_worker: StartWorker, gates: Gates, queue_name: str
) -> None:
    # Given six tasks whose results, each under the default limit, add up to
    # more than one gRPC message holds, all running on one worker...
    size = 15_000_000
    count = 6
    assert size < DEFAULT_MAX_RESULT_BYTES and count * size > MAX_MESSAGE_BYTES
    master = start_master(lease_s=60.0)
    proxy = FaultyProxy(master.port)
    metrics = f"127.0.0.1:{free_port()}"
    start_worker(
        proxy.address,
        queues=queue_name,
        concurrency=count,
        extra=["--metrics-listen", metrics],
        wait_connected=False,
    )
    try:
        with master.client() as client:
            poll(lambda: client.stats().workers, WAIT_S, "the worker to connect")
            held = [gates.new(f"blob-{i}") for i in range(count)]
            task_ids = client.submit_many(
                make_spec("blob_after", [gate, size], queue=queue_name) for gate in held
            )
            poll(lambda: all(gates.started(g, 1) for g in held), WAIT_S, "all six to start")

            # ...and finishing while the worker is cut off, so all six are
            # waiting to be sent in one go when it reconnects
            proxy.cut()
            poll(lambda: not client.stats().workers, WAIT_S, "the master to see it go")
            gates.open(*held)
            poll(lambda: tasks_run(metrics, "blob_after") == count, WAIT_S, "all six to end")

            # When the connection comes back
            proxy.restore()

            # Then every result arrives whole, each reported by its first attempt
            done = final(client, task_ids)
            for task_id in task_ids:
                task = done[task_id]
                assert task.state == TaskState.SUCCEEDED, task.error
                assert task.attempts == 1
                assert len(task_result(task)) == size
    finally:
        proxy.close()


def test_a_result_over_the_limit_fails_its_task_naming_the_size(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker with a 100 kB result limit
    start_worker(master, queues=queue_name, extra=["--max-result-bytes", "100000"])

    # When a task returns 200 kB (it would be retried, had it attempts left)
    task_id = client.submit("blob", [200_000], queue=queue_name, max_attempts=3)
    small_id = client.submit("blob", [1000], queue=queue_name)

    # Then it fails for good with ResultTooLarge naming the size and the limit
    done = final(client, [task_id, small_id])
    task = done[task_id]
    assert (task.state, task.attempts) == (TaskState.FAILED, 1)
    assert task.error is not None and task.error.type == "ResultTooLarge"
    assert "200002 bytes" in task.error.message and "100000" in task.error.message
    # ...and a result under the limit is not affected
    assert task_result(done[small_id]) == "x" * 1000


def test_an_error_over_the_limit_is_cut_short_keeping_its_type(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker with a 10 kB result limit
    start_worker(master, queues=queue_name, extra=["--max-result-bytes", "10000"])

    # When a task raises with a 50 kB message
    task_id = client.submit("boom", ["why " * 12_500], queue=queue_name)

    # Then it fails with its own error type, the text cut to the limit
    task = final(client, [task_id])[task_id]
    assert task.state == TaskState.FAILED
    assert task.error is not None
    assert task.error.type == "RuntimeError"
    assert task.error.message.startswith("why why")
    assert "bytes cut" in task.error.message
    assert task.error.traceback.startswith("Traceback")  # where it was called from
    assert len(task.error.message.encode()) + len(task.error.traceback.encode()) <= 10_000


def test_the_master_refuses_a_result_over_its_own_limit(
    start_master: StartMaster, queue_name: str
) -> None:
    # Given a master with a 1000-byte result limit, and a worker that ignores it
    master = start_master(extra=["--max-result-bytes", "1000"])
    with master.client() as client, grpc.insecure_channel(master.address) as channel:
        hand = HandWorker(channel, queue_name)
        try:
            task_ids = [client.submit("square", [n], queue=queue_name) for n in (1, 2)]
            hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=2)))
            refs = [a.lease for a in hand.receive().assignments.assignments]
            assert len(refs) == 2

            # When it reports 5000 bytes for one task, and a small result for the other
            outcomes = [
                worker_pb2.Outcome(lease=ref, state=tasks_pb2.TASK_STATE_SUCCEEDED, result=result)
                for ref, result in zip(refs, [b'"' + b"x" * 4998 + b'"', b"4"], strict=True)
            ]
            hand.send(
                worker_pb2.WorkerMessage(results=worker_pb2.Results(seq=1, outcomes=outcomes))
            )

            # Then the stream goes on: the batch is acknowledged...
            assert hand.receive().results_ack.seq == 1
        finally:
            hand.close()
        # ...the large result is refused, naming its size, and the small one kept
        done = final(client, task_ids)
        large, small = (done[ref.task_id] for ref in refs)
        assert large.state == TaskState.FAILED
        assert large.error is not None and large.error.type == "ResultTooLarge"
        assert "5000 bytes" in large.error.message
        assert (small.state, small.result) == (TaskState.SUCCEEDED, b"4")


# -- assignments and submits -----------------------------------------------------


def test_tasks_adding_up_past_the_message_limit_are_submitted_and_assigned_in_parts(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str
) -> None:
    # Given 80 tasks of 900 kB each, each under the 1 MiB payload limit but
    # together more than one gRPC message holds
    size = 900_000
    count = 80
    assert count * size > MAX_MESSAGE_BYTES
    specs = [make_spec("length", ["x" * size], queue=queue_name) for _ in range(count)]

    # When they are submitted in one call...
    task_ids = client.submit_many(specs)
    assert len(set(task_ids)) == count

    # ...and a worker with a slot for each takes them all at once
    start_worker(master, queues=queue_name, concurrency=count)

    # Then each runs once and succeeds: none is lost in a message too large to send
    done = final(client, task_ids)
    for task_id in task_ids:
        task = done[task_id]
        assert (task.state, task.attempts) == (TaskState.SUCCEEDED, 1)
        assert task_result(task) == size


def test_a_spec_no_master_could_take_is_refused_before_anything_is_submitted(
    client: Client, queue_name: str
) -> None:
    # Given a small spec followed by one too large for any master
    small = make_spec("square", [3], queue=queue_name)
    huge = make_spec("length", ["x" * (MAX_ITEM_BYTES + 1)], queue=queue_name)

    # When both are submitted, the call is refused naming the large one...
    with pytest.raises(ResourceExhausted, match=r"specs\[1\]"):
        client.submit_many([small, huge])

    # ...and nothing was enqueued
    assert not [q for q in client.stats().queues if q.queue == queue_name]


def test_metadata_counts_in_the_payload_limit(start_master: StartMaster, queue_name: str) -> None:
    # Given a master with a 1000-byte payload limit
    master = start_master(extra=["--max-payload-bytes", "1000"])
    with master.client() as client:
        # When a task with a small payload but 2000 bytes of metadata is submitted
        spec = make_spec("square", [3], queue=queue_name, metadata={"note": "m" * 2000})

        # Then it is refused naming the metadata
        with pytest.raises(ResourceExhausted, match=r"tasks\[0\]\.metadata"):
            client.submit_many([spec])
        # ...while small metadata passes
        ok = make_spec("square", [3], queue=queue_name, metadata={"note": "m" * 100})
        assert client.submit_many([ok])


# -- undelivered assignments -------------------------------------------------------


def test_an_assignment_that_never_went_out_gives_its_attempt_back(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a worker behind a proxy, a master with long leases, and the proxy
    # stalled: nothing passes, so a large assignment cannot be sent
    master = start_master(lease_s=60.0, extra=["--max-payload-bytes", str(MAX_ITEM_BYTES)])
    proxy = FaultyProxy(master.port)
    start_worker(proxy.address, queues=queue_name, concurrency=1, wait_connected=False)
    try:
        with master.client() as client:
            # (a first task done there: the worker has asked for more, and the
            # master has that credit before anything is stalled)
            first = client.submit("square", [2], queue=queue_name)
            assert task_result(final(client, [first])[first]) == 4
            proxy.stall()

            # When a 20 MB task is leased to that worker
            size = 20_000_000
            assert size > BATCH_BYTES
            task_id = client.submit("length", ["x" * size], queue=queue_name)
            poll(lambda: client.get(task_id).state == TaskState.RUNNING, WAIT_S, "the lease")

            # Then once the master gives up on the connection, the task is back
            # at once, long before its lease could lapse, its attempt not counted
            back = poll(
                lambda: (t := client.get(task_id)).state == TaskState.PENDING and t,
                WAIT_S,
                "the task to come back",
            )
            assert back.attempts == 0

            # ...and once the proxy forwards again it runs as attempt 1
            proxy.restore()
            task = final(client, [task_id])[task_id]
            assert (task.state, task.attempts) == (TaskState.SUCCEEDED, 1)
            assert task_result(task) == size
    finally:
        proxy.close()
