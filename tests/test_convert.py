"""The protobuf edge: what the master sends is what protobuf's own helpers would send."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from taskfleet.common import convert
from taskfleet.common.model import (
    MAX_DURATION_S,
    Lease,
    LeaseRef,
    Outcome,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
)
from taskfleet.v1 import tasks_pb2, worker_pb2


@pytest.mark.parametrize(
    "unix_s", [1_795_931_436.9252043, 1.0, 0.25, 1_764_390_000.123456789, 1_764_390_000.9999999999]
)
def test_a_task_s_times_go_out_as_protobuf_would_set_them(unix_s: float) -> None:
    task = Task(
        "t1",
        TaskSpec("noop", "default"),
        TaskState.SUCCEEDED,
        created_at=unix_s,
        started_at=unix_s,
        finished_at=unix_s,
    )

    sent = convert.task_to_proto(task)

    expected = Timestamp()
    expected.FromNanoseconds(round(unix_s * 1e9))
    assert sent.created_at == sent.started_at == sent.finished_at == expected
    assert 0 <= sent.finished_at.nanos < 1_000_000_000
    assert convert.task_from_proto(sent).finished_at == pytest.approx(unix_s, abs=1e-9)


@pytest.mark.parametrize("content_type", [convert.JSON, "application/octet-stream", ""])
def test_an_outcome_says_its_content_type_only_when_it_is_not_json(content_type: str) -> None:
    outcome = Outcome(LeaseRef("t1", 3), TaskState.SUCCEEDED, b"x", content_type)
    pb = worker_pb2.Outcome()

    convert.fill_outcome(pb, outcome)

    assert pb.result_content_type == ("" if content_type == convert.JSON else content_type)
    assert convert.outcome_from_proto(pb).result_content_type == (content_type or convert.JSON)


def test_an_assignment_carries_what_a_worker_reads_of_its_task() -> None:
    spec = TaskSpec("add", "math", b'{"args": [1, 2]}', timeout_s=2.5, metadata={"k": "v"})
    task = Task("t1", spec, TaskState.RUNNING, attempts=2, lease=7, worker_id="w1", created_at=5.0)

    (message,) = convert.assignments_to_proto([Lease(task, 30.0)], results_ack=3)

    (assignment,) = message.assignments.assignments
    assert message.assignments.results_ack == 3
    assert (assignment.lease.task_id, assignment.lease.lease) == ("t1", 7)
    sent = assignment.task
    assert (sent.id, sent.state, sent.attempts) == ("t1", tasks_pb2.TASK_STATE_RUNNING, 2)
    assert convert.spec_from_proto(sent.spec) == spec
    assert not sent.worker_id and not sent.HasField("created_at")


@pytest.mark.parametrize("delay_s", [1e300, float("inf"), float("nan")])
def test_a_retry_delay_past_any_duration_goes_out_as_the_longest_one(delay_s: float) -> None:
    failed = TaskError("Retry", "again")
    outcome = Outcome(LeaseRef("t1", 1), TaskState.FAILED, error=failed, retry_delay_s=delay_s)
    pb = worker_pb2.Outcome()

    convert.fill_outcome(pb, outcome)

    assert (pb.retry_delay.seconds, pb.retry_delay.nanos) == (MAX_DURATION_S, 0)
    assert convert.outcome_from_proto(pb).retry_delay_s == MAX_DURATION_S
