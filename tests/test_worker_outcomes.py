"""How the worker reports a finished attempt, in-process: the Outcome it sends
and the label its metrics count it under."""

from __future__ import annotations

import dataclasses

import pytest

from taskfleet.common.model import JSON, LeaseRef, TaskError, TaskState
from taskfleet.common.result_limit import RESULT_TOO_LARGE
from taskfleet.worker.execute import Job, JobResult, failed
from taskfleet.worker.outcomes import outcome_label, outcome_of

REF = LeaseRef("t1", 3)
LIMIT_BYTES = 1000


def job(attempt: int = 1, max_attempts: int = 3) -> Job:
    return Job(REF, "square", "default", attempt, b"{}", JSON, 0.0, None, {}, max_attempts)


def test_a_success_reports_its_result() -> None:
    outcome = outcome_of(job(), JobResult(REF, ok=True, result=b"49"), LIMIT_BYTES)
    assert (outcome.ref, outcome.state, outcome.result) == (REF, TaskState.SUCCEEDED, b"49")
    assert outcome_label(job(), outcome) == "succeeded"


@pytest.mark.parametrize(("attempt", "label"), [(1, "retried"), (3, "failed")])
def test_a_failure_carries_max_attempts_for_the_masters_retry(attempt: int, label: str) -> None:
    result = failed(REF, "ValueError", "boom")
    outcome = outcome_of(job(attempt), result, LIMIT_BYTES)
    assert outcome.state is TaskState.FAILED and outcome.max_attempts == 3
    assert outcome.error == TaskError("ValueError", "boom")
    assert outcome_label(job(attempt), outcome) == label


def test_a_cancelled_attempt_is_reported_cancelled() -> None:
    outcome = outcome_of(job(), failed(REF, "Cancelled", "revoked", cancelled=True), LIMIT_BYTES)
    assert outcome.state is TaskState.CANCELLED
    assert outcome_label(job(), outcome) == "cancelled"


def test_a_result_over_the_limit_fails_for_good() -> None:
    result = JobResult(REF, ok=True, result=b"x" * (LIMIT_BYTES + 1))
    outcome = outcome_of(job(), result, LIMIT_BYTES)
    assert outcome.state is TaskState.FAILED and outcome.result == b""
    assert outcome.error is not None and outcome.error.type == RESULT_TOO_LARGE
    assert outcome_label(job(), outcome) == "failed"  # max_attempts 1: no retry


def test_a_failure_carries_the_tasks_own_retry_choice() -> None:
    result = dataclasses.replace(failed(REF, "Retry", "later"), retry_delay_s=2.5)
    assert outcome_of(job(), result, LIMIT_BYTES).retry_delay_s == 2.5
    final = dataclasses.replace(failed(REF, "KeyError", "k"), no_retry=True)
    assert outcome_of(job(), final, LIMIT_BYTES).no_retry
