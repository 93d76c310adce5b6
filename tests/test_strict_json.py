"""Only standard JSON in and out: NaN and Infinity are refused in payloads (on
submit, and in the client before sending) and in results (from Python workers
and from workers speaking the protocol themselves); Durations and Timestamps
with nanos out of range are refused rather than normalised; a huge exception
message is cut in the worker's log line but kept whole in the task."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskfleet.common import codec
from taskfleet.common.client import Client
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import JSON, Task, TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2

from procs import TESTS_DIR, MasterProc, WorkerProc, poll
from test_protocol import HandWorker, leases

WAIT_S = 30.0
TASKFLEET = str(Path(sys.executable).parent / "taskfleet")


@pytest.fixture
def stub(master: MasterProc) -> Iterator[tasks_pb2_grpc.TaskServiceStub]:
    with grpc.insecure_channel(master.address) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error: grpc.Call = raised.value  # type: ignore[assignment]
    return error.code(), error.details() or ""


@pytest.mark.parametrize(
    ("payload", "field", "token"),
    [
        (b'{"args":[1,NaN],"kwargs":{}}', "tasks[1].payload.args[1]", "NaN"),
        (
            b'{"args":[],"kwargs":{"limits":{"hi":Infinity}}}',
            "tasks[1].payload.kwargs.limits.hi",
            "Infinity",
        ),
        (b'{"args":[[-Infinity]]}', "tasks[1].payload.args[0][0]", "-Infinity"),
    ],
)
def test_submit_refuses_nan_and_infinity_naming_the_field(
    stub: tasks_pb2_grpc.TaskServiceStub,
    client: Client,
    queue_name: str,
    payload: bytes,
    field: str,
    token: str,
) -> None:
    # Given a batch whose second task carries a non-standard number
    good = tasks_pb2.TaskSpec(name="square", queue=queue_name, payload=b'{"args":[2]}')
    bad = tasks_pb2.TaskSpec(name="square", queue=queue_name, payload=payload)

    # When it is submitted, then the whole Submit is refused, naming the spot
    code, message = refusal(
        lambda: stub.Submit(tasks_pb2.SubmitRequest(tasks=[good, bad]), timeout=WAIT_S)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: {token} is not standard JSON"), message

    # And nothing of it was stored
    assert all(q.queue != queue_name for q in client.stats().queues)


def test_the_client_refuses_nan_before_sending(client: Client, queue_name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"payload\.kwargs\.x: NaN is not standard JSON"):
        client.submit("square", [], {"x": float("nan")}, queue=queue_name)
    assert all(q.queue != queue_name for q in client.stats().queues)


def test_the_cli_refuses_nan_in_one_line_with_exit_2(master: MasterProc, queue_name: str) -> None:
    done = subprocess.run(
        [TASKFLEET, "submit", "square", "NaN", "--queue", queue_name, "--master", master.address],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=TESTS_DIR,
    )
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "taskfleet submit: error: payload.args[0]: NaN is not standard JSON "
        "(jq and JavaScript reject it); use null or a string"
    ]


def run_one(client: Client, name: str, arg: object, queue_name: str) -> Task:
    task_id = client.submit(name, [arg], queue=queue_name, max_attempts=1)
    (task,) = client.wait([task_id], timeout_s=WAIT_S)
    return task


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_a_result_with_nan_or_infinity_fails_the_task(
    master: MasterProc,
    client: Client,
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
    kind: str,
) -> None:
    # Given a worker whose task returns NaN or an infinity inside a structure
    start_worker(master, tasks="jsontasks", queues=queue_name)

    # When it runs
    task = run_one(client, "non_finite", kind, queue_name)

    # Then the task fails, naming where the number is, and stores no result
    assert task.state == TaskState.FAILED
    assert task.error is not None
    assert task.error.type == "ResultNotSerializable"
    assert "result.mean[1]: " in task.error.message
    assert "is not standard JSON" in task.error.message
    assert task.result == b""


@pytest.fixture
def hand(master: MasterProc, queue_name: str) -> Iterator[HandWorker]:
    with grpc.insecure_channel(master.address) as channel:
        worker = HandWorker(channel, queue_name)
        yield worker
        worker.close()


def lease_one(hand: HandWorker, client: Client, queue_name: str) -> worker_pb2.LeaseRef:
    client.submit("square", [3], queue=queue_name)
    hand.send(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=1)))
    (ref,) = leases(hand.receive())
    return ref


def report(hand: HandWorker, outcome: worker_pb2.Outcome) -> None:
    """Send ``outcome`` and wait for the master to acknowledge it."""
    hand.send(worker_pb2.WorkerMessage(results=worker_pb2.Results(seq=1, outcomes=[outcome])))
    while True:
        message = hand.receive()
        if message.WhichOneof("kind") == "results_ack":
            assert message.results_ack.seq == 1
            return


@pytest.mark.parametrize("result", [b'{"mean":NaN}', b"[1,-Infinity]", b"{not json"])
def test_the_master_refuses_a_non_standard_result_from_a_worker(
    hand: HandWorker, client: Client, queue_name: str, result: bytes
) -> None:
    # Given a worker, not written in Python, holding a task
    ref = lease_one(hand, client, queue_name)

    # When it reports success with a result no JSON reader accepts
    report(hand, worker_pb2.Outcome(lease=ref, state=tasks_pb2.TASK_STATE_SUCCEEDED, result=result))

    # Then the master records a failure instead of storing those bytes
    task = client.get(ref.task_id)
    assert task.state == TaskState.FAILED
    assert task.error is not None
    assert task.error.type == "ResultNotSerializable"
    assert task.error.message.startswith("the master refused the result the worker sent: result")
    assert task.result == b""


def bad_duration(seconds: int, nanos: int) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(1, 1_000_000_000), (0, -1_000_000_000), (5, -1), (-5, 1)]
)
def test_durations_with_nanos_out_of_range_are_refused(
    stub: tasks_pb2_grpc.TaskServiceStub, client: Client, queue_name: str, seconds: int, nanos: int
) -> None:
    duration = bad_duration(seconds, nanos)
    spec = tasks_pb2.TaskSpec(name="square", queue=queue_name, payload=b'{"args":[2]}')

    # A task timeout
    with_timeout = tasks_pb2.TaskSpec(name="square", queue=queue_name, timeout=duration)
    code, message = refusal(
        lambda: stub.Submit(tasks_pb2.SubmitRequest(tasks=[spec, with_timeout]), timeout=WAIT_S)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("tasks[1].timeout: nanos must be within"), message

    # A wait's timeout, in each of the calls that take one
    task_id = client.submit("square", [2], queue=queue_name)
    calls: list[Callable[[], object]] = [
        lambda: list(
            stub.WaitTasks(
                tasks_pb2.WaitTasksRequest(task_ids=[task_id], timeout=duration), timeout=WAIT_S
            )
        ),
        lambda: list(
            stub.WaitTasksBatched(
                tasks_pb2.WaitTasksBatchedRequest(task_ids=[task_id], timeout=duration),
                timeout=WAIT_S,
            )
        ),
        lambda: list(
            stub.SubmitAndWait(
                tasks_pb2.SubmitAndWaitRequest(tasks=[spec], timeout=duration), timeout=WAIT_S
            )
        ),
    ]
    for call in calls:
        code, message = refusal(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message.startswith("timeout: nanos must be within"), message


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000])
def test_a_not_before_with_nanos_out_of_range_is_refused(
    stub: tasks_pb2_grpc.TaskServiceStub, queue_name: str, nanos: int
) -> None:
    spec = tasks_pb2.TaskSpec(
        name="square", queue=queue_name, not_before=Timestamp(seconds=1_700_000_000, nanos=nanos)
    )
    code, message = refusal(
        lambda: stub.Submit(tasks_pb2.SubmitRequest(tasks=[spec]), timeout=WAIT_S)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("tasks[0].not_before: nanos must be within 0..999999999"), message


def test_a_huge_exception_message_is_cut_in_the_log_but_kept_in_the_task(
    master: MasterProc, client: Client, start_worker: Callable[..., WorkerProc], queue_name: str
) -> None:
    # Given a task that raises with a 2 MB message
    n_chars = 2 * 1024 * 1024
    worker = start_worker(master, tasks="jsontasks", queues=queue_name)

    # When it runs and fails
    task = run_one(client, "raise_long", n_chars, queue_name)

    # Then the task keeps the whole message
    assert task.state == TaskState.FAILED
    assert task.error is not None
    assert task.error.message == "x" * n_chars

    # And the worker logged one line for it, cut to a few KB with a marker
    def failure_line() -> str | None:
        lines = [x for x in worker.output().splitlines() if "task raise_long failed" in x]
        return lines[0] if lines else None

    line = poll(failure_line, WAIT_S, "the failure's log line")
    assert len(line) < 8 * 1024
    assert line.endswith(f"[{n_chars - 4096} more characters cut from this line]")
    assert "x" * 4096 in line


def test_the_shortcuts_for_no_arguments_and_none_match_the_codec() -> None:
    # A call without arguments and a task returning None skip the JSON codec.
    assert codec.decode_args(codec.encode_args((), {}), JSON) == ([], {})
    assert codec.decode_args(b'{"args": [], "kwargs": {}}', JSON) == ([], {})
    assert codec.encode_result(None) == json.dumps(None).encode()
    assert codec.decode_result(codec.encode_result(None), JSON) is None
