"""How the worker reports a finished attempt: the Outcome it sends (within
``--max-result-bytes``), the label its metrics count it under, and its log line.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

from taskfleet.common.logs import bound_context, clipped
from taskfleet.common.model import Outcome, TaskError, TaskState
from taskfleet.common.result_limit import limit_outcome
from taskfleet.worker.execute import Job, JobResult

log = logging.getLogger("taskfleet.worker")


def outcome_of(job: Job, result: JobResult, max_result_bytes: int) -> Outcome:
    """The outcome to report; for a failed attempt, the master decides on a retry."""
    if result.ok:
        outcome = Outcome(job.ref, TaskState.SUCCEEDED, result=result.result)
    else:
        error = result.error or TaskError("Unknown", "no error recorded")
        if result.cancelled:
            outcome = Outcome(job.ref, TaskState.CANCELLED, error=error)
        else:
            outcome = Outcome(
                job.ref,
                TaskState.FAILED,
                error=error,
                max_attempts=job.max_attempts,
                no_retry=result.no_retry,
                retry_delay_s=result.retry_delay_s,
            )
    return limit_outcome(outcome, max_result_bytes)


def outcome_label(job: Job, outcome: Outcome) -> str:
    """How ``outcome`` ended, as the metrics name it: a failure with attempts left
    by this attempt's number is "retried" (the master decides, and also gives
    back the attempts of lost leases, so it may retry more)."""
    if outcome.state is TaskState.FAILED and job.attempt < outcome.max_attempts:
        return "retried"
    return outcome.state.name.lower()


def log_context(job: Job) -> AbstractContextManager[dict[str, str]]:
    """The logging context of lines about ``job``: its task id and attempt."""
    return bound_context(task_id=job.ref.task_id, attempt=str(job.attempt), task=job.name)


def log_outcome(job: Job, result: JobResult, outcome: Outcome) -> None:
    """One line on how an attempt ended: failures always, successes at DEBUG, and
    a result over ``--max-result-bytes``. Call outside the worker's lock:
    logging may block on I/O."""
    if not result.ok or log.isEnabledFor(logging.DEBUG):
        _log_result(job, result)
    elif outcome.error is not None:
        with log_context(job):
            error = outcome.error
            log.warning("task %s failed: %s: %s", job.name, error.type, error.message)


def _log_result(job: Job, result: JobResult) -> None:
    error = result.error or TaskError("Unknown", "no error recorded")
    with log_context(job):
        if result.ok:
            log.debug("task %s succeeded", job.name)
        elif result.cancelled:
            log.info("task %s stopped: %s", job.name, clipped(error.message))
        elif job.attempt < job.max_attempts:
            log.warning(
                "task %s failed on attempt %d of %d, will retry: %s: %s",
                job.name,
                job.attempt,
                job.max_attempts,
                error.type,
                clipped(error.message),
            )
        else:
            log.warning(
                "task %s failed for good on attempt %d: %s: %s",
                job.name,
                job.attempt,
                error.type,
                clipped(error.message),
            )
