"""The batching parts of the wire protocol, driven message by message over real
gRPC against a real master: acknowledgements that ride on assignments, credit
carried with results, cumulative acks, and WaitTasksBatched."""

from __future__ import annotations

import queue
import signal
import socket
import threading
from collections.abc import Iterable, Iterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from taskfleet.common.client import Client, make_spec
from taskfleet.common.codec import encode_args
from taskfleet.common.errors import DeadlineExceeded, TaskFailed
from taskfleet.common.model import TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2, worker_pb2_grpc

from procs import MasterProc

WAIT_S = 30.0


class HandWorker:
    """A worker stream whose every message the test writes and reads itself."""

    def __init__(self, channel: grpc.Channel, queue_name: str) -> None:
        self._requests: queue.SimpleQueue[worker_pb2.WorkerMessage | None] = queue.SimpleQueue()
        hello = worker_pb2.Hello(
            worker_id=f"hand-{queue_name}",
            hostname=socket.gethostname(),
            pid=1,
            queues=[queue_name],
            task_names=["square"],
            concurrency=1,
        )
        self._requests.put(worker_pb2.WorkerMessage(hello=hello))
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        self._responses = stub.Connect(iter(self._requests.get, None), timeout=WAIT_S)
        assert self.receive().WhichOneof("kind") == "welcome"

    def send(self, message: worker_pb2.WorkerMessage) -> None:
        self._requests.put(message)

    def receive(self) -> worker_pb2.MasterMessage:
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()  # type: ignore[attr-defined]

    def results(self, seq: int, refs: list[worker_pb2.LeaseRef], credit: int = 0) -> None:
        """Report every lease in ``refs`` as SUCCEEDED with result ``seq``."""
        outcomes = [
            worker_pb2.Outcome(
                lease=ref, state=tasks_pb2.TASK_STATE_SUCCEEDED, result=str(seq).encode()
            )
            for ref in refs
        ]
        self.send(
            worker_pb2.WorkerMessage(
                results=worker_pb2.Results(seq=seq, outcomes=outcomes, credit=credit)
            )
        )


@pytest.fixture
def channel(master: MasterProc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(master.address) as channel:
        yield channel


@pytest.fixture
def hand(channel: grpc.Channel, queue_name: str) -> Iterator[HandWorker]:
    worker = HandWorker(channel, queue_name)
    yield worker
    worker.close()


def submit_squares(client: Client, numbers: Iterable[int], queue_name: str) -> list[str]:
    return client.submit_many(make_spec("square", [n], queue=queue_name) for n in numbers)


def raw_square(queue_name: str, n: int) -> tasks_pb2.TaskSpec:
    return tasks_pb2.TaskSpec(name="square", queue=queue_name, payload=encode_args([n], {}))


def leases(message: worker_pb2.MasterMessage) -> list[worker_pb2.LeaseRef]:
    assert message.WhichOneof("kind") == "assignments", message
    return [a.lease for a in message.assignments.assignments]


def test_the_ack_of_a_batch_rides_on_the_assignments_its_credit_brings(
    hand: HandWorker, client: Client, queue_name: str
) -> None:
    # Given five tasks, and a worker that asked for two
    task_ids = submit_squares(client, range(5), queue_name)
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=2)))
    first = hand.receive()
    assert first.assignments.results_ack == 0
    taken = leases(first)
    assert len(taken) == 2

    # When it reports both, asking for three more in the same message
    hand.results(1, taken, credit=3)

    # Then one message answers both: three new tasks, and the ack of batch 1
    answer = hand.receive()
    assert answer.assignments.results_ack == 1
    taken_next = leases(answer)
    assert len(taken_next) == 3
    assert {r.task_id for r in taken + taken_next} == set(task_ids)

    # And the first two are recorded, with the result they were reported with
    for ref in taken:
        task = client.get(ref.task_id)
        assert (task.state, task.result) == (TaskState.SUCCEEDED, b"1")


def test_acks_are_cumulative_and_come_alone_when_no_task_is_ready(
    hand: HandWorker, client: Client, queue_name: str
) -> None:
    # Given a worker holding two tasks
    submit_squares(client, [1, 2], queue_name)
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=2)))
    taken = leases(hand.receive())

    # When it sends two batches back to back, asking for more with the queue empty
    hand.results(1, taken[:1], credit=1)
    hand.results(2, taken[1:], credit=1)

    # Then the acks come as ResultsAck, the last one covering batch 2
    acked = 0
    while acked < 2:
        message = hand.receive()
        assert message.WhichOneof("kind") == "results_ack", message
        assert message.results_ack.seq > acked
        acked = message.results_ack.seq
    assert acked == 2
    assert [t.state for t in client.wait([r.task_id for r in taken], WAIT_S)] == [
        TaskState.SUCCEEDED
    ] * 2

    # And the credit it carried is kept: a task submitted now is handed over
    late = client.submit("square", [3], queue=queue_name)
    assert [r.task_id for r in leases(hand.receive())] == [late]


def test_an_idle_workers_ack_waits_to_ride_on_its_next_assignments(
    hand: HandWorker, client: Client, queue_name: str
) -> None:
    # Given a worker that runs one task at a time, reporting each as it gets it,
    # holding nothing in between
    runs = 10
    ridden: list[int] = []

    def serve() -> None:
        hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=1)))
        for seq in range(1, runs + 1):
            while (message := hand.receive()).WhichOneof("kind") != "assignments":
                pass  # an ack that went alone: the next task came too late to carry it
            if message.assignments.results_ack:
                ridden.append(message.assignments.results_ack)
            hand.results(seq, leases(message), credit=1)

    server = threading.Thread(target=serve)
    server.start()

    # When tasks are run one after the other
    for n in range(runs):
        assert client.run("square", [n], queue=queue_name, timeout_s=WAIT_S) == n + 1
    server.join(WAIT_S)

    # Then the ack of each task's results rode on the next task's assignments
    # rather than going alone first (a message less each way), in order
    assert ridden, "every ack went alone"
    assert ridden == sorted(ridden)
    assert set(ridden) <= set(range(1, runs))


def test_a_held_back_ack_still_reaches_the_worker_when_the_master_stops(
    master: MasterProc, hand: HandWorker, client: Client, queue_name: str
) -> None:
    # Given a worker whose only task is recorded, so it holds nothing and the ack
    # of its results may wait (up to 20 ms) for work to ride on
    task_id = client.submit("square", [2], queue=queue_name)
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=1)))
    hand.results(1, leases(hand.receive()), credit=1)
    assert [t.state for t in client.wait([task_id], WAIT_S)] == [TaskState.SUCCEEDED]

    # When the master stops at once
    master.signal(signal.SIGTERM)

    # Then the ack comes before the stream ends: a draining worker waits for it
    acked = 0
    try:
        while not acked:
            message = hand.receive()
            if message.WhichOneof("kind") == "results_ack":
                acked = message.results_ack.seq
    except (StopIteration, grpc.RpcError):
        pass
    assert acked == 1
    assert master.wait() == 0


def test_wait_tasks_batched_sends_what_wait_tasks_sends_in_few_messages(
    hand: HandWorker, channel: grpc.Channel, client: Client, queue_name: str
) -> None:
    # Given 1,200 finished tasks (more than one message carries)
    task_ids = submit_squares(client, range(1_200), queue_name)
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=len(task_ids))))
    taken: list[worker_pb2.LeaseRef] = []
    while len(taken) < len(task_ids):
        taken += leases(hand.receive())
    hand.results(1, taken)
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    assert len(list(client.wait(task_ids, WAIT_S))) == len(task_ids)

    # When both RPCs are asked for them
    one_by_one = list(stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=task_ids), timeout=WAIT_S))
    batched_request = tasks_pb2.WaitTasksBatchedRequest(task_ids=task_ids)
    batches = list(stub.WaitTasksBatched(batched_request, timeout=WAIT_S))

    # Then the batched one sends the same tasks, in the same order, in two messages
    assert [len(b.tasks) for b in batches] == [1_000, 200]
    batched = [task for batch in batches for task in batch.tasks]
    assert batched == one_by_one
    assert {t.id for t in batched} == set(task_ids)


def test_wait_tasks_batched_refuses_bad_input_as_wait_tasks_does(channel: grpc.Channel) -> None:
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    for ids, field in (([], "task_ids"), (["ok", ""], "task_ids[1]")):
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.WaitTasksBatched(
                    tasks_pb2.WaitTasksBatchedRequest(task_ids=ids), timeout=WAIT_S
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()


def test_a_wait_naming_unknown_ids_is_refused_naming_the_first_as_get_task_does(
    channel: grpc.Channel, client: Client, queue_name: str
) -> None:
    # Given a task that waits (no worker serves its queue), asked for among unknown ids
    (pending,) = submit_squares(client, [1], queue_name)
    task_ids = [pending, "missing-1", "missing-2"]
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.RpcError) as got:
        stub.GetTask(tasks_pb2.GetTaskRequest(task_id="missing-1"), timeout=WAIT_S)

    # When both waits are asked for them, then each is refused at once with GetTask's error
    for wait in (
        lambda: stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=task_ids), timeout=WAIT_S),
        lambda: stub.WaitTasksBatched(
            tasks_pb2.WaitTasksBatchedRequest(task_ids=task_ids), timeout=WAIT_S
        ),
    ):
        with pytest.raises(grpc.RpcError) as waited:
            list(wait())
        assert waited.value.code() == grpc.StatusCode.NOT_FOUND
        assert waited.value.details() == got.value.details()
    assert "missing-1" in (got.value.details() or "")


def test_submit_and_wait_sends_the_ids_first_then_each_task_as_it_ends(
    hand: HandWorker, channel: grpc.Channel, queue_name: str
) -> None:
    # Given two tasks submitted and waited for in one call
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    specs = [raw_square(queue_name, n) for n in (3, 4)]
    stream = stub.SubmitAndWait(tasks_pb2.SubmitAndWaitRequest(tasks=specs), timeout=WAIT_S)

    # Then the first message names both tasks, and carries none yet
    first = next(stream)
    task_ids = list(first.task_ids)
    assert len(task_ids) == 2
    assert not first.tasks

    # When a worker finishes them
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=2)))
    taken = leases(hand.receive())
    hand.results(1, taken)

    # Then they come on the same stream, final, and the stream ends
    finished = [task for response in stream for task in response.tasks]
    assert sorted(t.id for t in finished) == sorted(task_ids)
    assert {(t.state, t.result) for t in finished} == {(tasks_pb2.TASK_STATE_SUCCEEDED, b"1")}


def test_submit_and_wait_refuses_bad_input_before_submitting_anything(
    channel: grpc.Channel, client: Client, queue_name: str
) -> None:
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    good = raw_square(queue_name, 1)
    bad_name = tasks_pb2.TaskSpec(name="", queue=queue_name)
    negative = Duration(seconds=-1)
    cases = [
        (tasks_pb2.SubmitAndWaitRequest(tasks=[good, bad_name]), "tasks[1].name"),
        (tasks_pb2.SubmitAndWaitRequest(tasks=[good], timeout=negative), "timeout"),
        (tasks_pb2.SubmitAndWaitRequest(), "tasks"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SubmitAndWait(request, timeout=WAIT_S))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()
    assert queue_name not in {q.queue for q in client.stats().queues}


def test_client_run_returns_the_result_or_raises(
    hand: HandWorker, client: Client, queue_name: str
) -> None:
    # Given a worker that reports its first task as done and its second as failed
    def serve() -> None:
        hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=1)))
        hand.results(1, leases(hand.receive()), credit=1)
        while (message := hand.receive()).WhichOneof("kind") == "results_ack":
            pass  # the ack of batch 1 comes alone: the next task is not submitted yet
        (ref,) = leases(message)
        failure = worker_pb2.Outcome(
            lease=ref,
            state=tasks_pb2.TASK_STATE_FAILED,
            error=tasks_pb2.TaskError(type="ValueError", message="no"),
        )
        hand.send(worker_pb2.WorkerMessage(results=worker_pb2.Results(seq=2, outcomes=[failure])))

    server = threading.Thread(target=serve)
    server.start()

    # When tasks are run through the client
    first = client.run("square", [4], queue=queue_name, timeout_s=WAIT_S)
    with pytest.raises(TaskFailed) as failed:
        client.run("square", [5], queue=queue_name, timeout_s=WAIT_S)
    server.join(WAIT_S)

    # Then the result comes back, and the failure is raised with its error
    assert first == 1
    assert "ValueError" in str(failed.value)

    # And a task no worker takes in time raises DeadlineExceeded naming it; it stays queued
    with pytest.raises(DeadlineExceeded) as late:
        client.run("square", [6], queue=queue_name, timeout_s=0.2)
    task_id = str(late.value).split()[1]
    assert client.get(task_id).state == TaskState.PENDING
