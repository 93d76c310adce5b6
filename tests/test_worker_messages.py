"""What the worker sends, built in-process: a batch goes out whatever an outcome holds."""

from __future__ import annotations

from taskfleet.common.model import LeaseRef, Outcome, TaskState
from taskfleet.v1 import tasks_pb2
from taskfleet.worker import messages


def test_an_outcome_protobuf_refuses_goes_out_as_a_failure_and_the_batch_with_it() -> None:
    # Given a batch whose first outcome has a field no int32 holds
    refused = Outcome(LeaseRef("t1", 1), TaskState.SUCCEEDED, b"1", max_attempts=2**31)
    fine = Outcome(LeaseRef("t2", 4), TaskState.SUCCEEDED, b"2")

    # When it is built
    message = messages.results(7, [refused, fine], credit=3)

    # Then both outcomes go, the refused one as a failure saying why
    first, second = message.results.outcomes
    assert (message.results.seq, message.results.credit) == (7, 3)
    assert (first.lease.task_id, first.lease.lease) == ("t1", 1)
    assert first.state == tasks_pb2.TASK_STATE_FAILED and first.no_retry
    assert first.error.type == "OutcomeNotSendable"
    assert "out of range" in first.error.message
    assert (second.lease.task_id, second.state, second.result) == (
        "t2",
        tasks_pb2.TASK_STATE_SUCCEEDED,
        b"2",
    )
