"""The worker's lease book, in-process: which jobs wait, run, are revoked, and
what a drain hands back. No master, no pool, no threads."""

from __future__ import annotations

import time

from taskfleet.common.model import JSON, LeaseRef
from taskfleet.worker.execute import Job
from taskfleet.worker.lease_book import LeaseBook


def job(task_id: str, timeout_s: float = 0.0, deadline: float | None = None) -> Job:
    return Job(
        ref=LeaseRef(task_id, 1),
        name="square",
        queue="default",
        attempt=1,
        payload=b"{}",
        content_type=JSON,
        timeout_s=timeout_s,
        deadline=deadline,
        metadata={},
    )


def test_accepted_jobs_wait_and_start_in_the_order_they_came() -> None:
    book = LeaseBook()
    a, b = job("a"), job("b")

    assert book.accept([a, b]) == []
    assert book.holding() == 2 and book.held() == [a.ref, b.ref]

    assert book.start(1) == [a]
    assert list(book.running) == [a.ref]
    assert book.start(2) == [b]
    assert book.start(1) == []
    assert book.holding() == 2 and book.held() == [a.ref, b.ref]


def test_a_time_limit_counts_from_the_start_not_from_the_arrival() -> None:
    # Given a job with a 10 s limit whose deadline was set when it arrived, long ago
    book = LeaseBook()
    book.accept([job("limited", timeout_s=10.0, deadline=time.time() - 100.0), job("free")])
    # When it starts
    before = time.time()
    limited, free = book.start(2)
    # Then its deadline is 10 s from now; a job without a limit has none
    assert limited.deadline is not None and limited.deadline >= before + 10.0
    assert book.running[limited.ref] == limited
    assert free.deadline is None


def test_a_finished_job_leaves_the_book_with_its_run_time() -> None:
    book = LeaseBook()
    book.accept([job("a")])
    (started,) = book.start(1)

    finished = book.finish(started.ref)

    assert finished is not None
    assert finished.job == started and finished.wanted and finished.run_s >= 0.0
    assert book.holding() == 0
    assert book.finish(started.ref) is None  # reported once only


def test_revoked_jobs_are_dropped_or_returned_for_cancelling() -> None:
    # Given one running and two prefetched jobs
    book = LeaseBook()
    running, waiting, kept = job("running"), job("waiting"), job("kept")
    book.accept([running, waiting, kept])
    book.start(1)
    # When the master revokes the running one and one waiting
    to_cancel = book.revoke([waiting.ref, running.ref, LeaseRef("unknown", 1)])
    # Then the waiting one is gone, the running one is to cancel, the third stays
    assert to_cancel == [running]
    assert list(book.prefetched) == [kept]
    # ... and the cancelled job's outcome is not wanted, once
    finished = book.finish(running.ref)
    assert finished is not None and not finished.wanted
    assert not book.revoked


def test_a_drain_hands_back_what_has_not_started_and_takes_nothing_new() -> None:
    # Given one running and one prefetched job
    book = LeaseBook()
    running, waiting, late = job("running"), job("waiting"), job("late")
    book.accept([running, waiting])
    book.start(1)
    # When the worker drains
    assert book.drain() == [waiting]
    # Then nothing more starts, and jobs arriving late go straight back
    assert book.draining and book.start(1) == []
    assert book.accept([late]) == [late]
    assert book.held() == [running.ref]
