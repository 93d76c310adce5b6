"""The Store contract, run against every store: what the master relies on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    Outcome,
    PendingName,
    Progress,
    Schedule,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
)
from taskfleet.master.store import MemoryStore, SqliteStore, Store, StorePolicy, open_store
from taskfleet.master.store.base import FiredTick, TaskQuery

from pg import store_url

NOW = 1_000_000.0
LEASE_S = 30.0
BOOM = TaskError("ValueError", "boom", "Traceback (most recent call last): ...")
# Retries wait 10 s per attempt used: exact, so tests can name the moment.
POLICY = StorePolicy(retry_backoff_s=lambda used: 10.0 * used)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with store_url(request.param, tmp_path) as url:
        opened = open_store(url, POLICY)
        yield opened
        opened.close()


def spec(name: str = "add", queue: str = "q", **options: Any) -> TaskSpec:
    return TaskSpec(name=name, queue=queue, **options)


def lease(
    store: Store,
    *,
    now: float = NOW,
    worker: str = "w1",
    queues: tuple[str, ...] = ("q",),
    names: tuple[str, ...] | None = None,
    limit: int = 10,
) -> list[Lease]:
    return store.lease(worker, queues, names, limit, LEASE_S, now)


def leased_ids(leases: list[Lease]) -> list[str]:
    return [one.task.id for one in leases]


def succeeded(ref: LeaseRef, result: bytes = b"3") -> Outcome:
    return Outcome(ref, TaskState.SUCCEEDED, result=result)


def failed(ref: LeaseRef, max_attempts: int = 1) -> Outcome:
    return Outcome(ref, TaskState.FAILED, error=BOOM, max_attempts=max_attempts)


def counts(store: Store) -> dict[str, dict[TaskState, int]]:
    return {c.queue: c.counts for c in store.stats()}


def submit_one(store: Store, **options: Any) -> str:
    return store.submit([spec(**options)], NOW)[0]


# submit and get


def test_ids_are_hex_and_grow_with_time(store: Store) -> None:
    # Given tasks submitted in one millisecond and then in a later one
    first = store.submit([spec(), spec()], NOW)
    started_ms = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == started_ms:
        pass  # the clock must move on: ids order by their creation millisecond
    later = store.submit([spec()], NOW)

    # Then every id is 32 lowercase hex digits, distinct, and the later one sorts last
    ids = [*first, *later]
    assert all(len(i) == 32 and i == i.lower() and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == 3
    assert max(first) < later[0]


def test_submit_returns_ids_in_order_and_tasks_are_pending(store: Store) -> None:
    ids = store.submit([spec("a"), spec("b", metadata={"k": "v"}), spec("c")], NOW)

    tasks = store.get_many(ids)

    assert len(set(ids)) == 3
    assert [t.spec.name for t in tasks] == ["a", "b", "c"]
    assert all(t.state is TaskState.PENDING and t.created_at == NOW for t in tasks)
    assert all(t.attempts == 0 and t.lease == 0 and t.error is None for t in tasks)
    assert tasks[1].spec == spec("b", metadata={"k": "v"})


def test_get_many_keeps_the_order_asked(store: Store) -> None:
    first, second = store.submit([spec("a"), spec("b")], NOW)

    tasks = store.get_many([second, first, second])

    assert [t.id for t in tasks] == [second, first, second]


def test_unknown_ids_raise_not_found_naming_the_id(store: Store) -> None:
    known = submit_one(store)

    with pytest.raises(NotFound, match="nope"):
        store.get("nope")
    with pytest.raises(NotFound, match="missing-1"):
        store.get_many([known, "missing-1", "missing-2"])
    with pytest.raises(NotFound, match="nope"):
        store.cancel("nope", NOW)


# get_final: what a wait sends at once


def test_get_final_returns_the_final_tasks_only_in_the_order_asked(store: Store) -> None:
    # Given a task in every state: three ended by their outcomes, one retried
    # (PENDING with its error), one RUNNING, one cancelled while PENDING, one PENDING
    ok, bad, stopped, retried, running, cancelled, pending = store.submit([spec()] * 7, NOW)
    refs = [one.ref for one in lease(store, limit=5)]
    store.record(
        [
            succeeded(refs[0]),
            failed(refs[1]),
            Outcome(refs[2], TaskState.CANCELLED),
            failed(refs[3], max_attempts=2),
        ],
        NOW,
    )
    store.cancel(cancelled, NOW)
    asked = [pending, cancelled, running, retried, stopped, bad, ok]

    final = store.get_final(asked)

    # Then the final ones come back whole, in the order asked, and no other
    assert [t.id for t in final] == [cancelled, stopped, bad, ok]
    states = [TaskState.CANCELLED, TaskState.CANCELLED, TaskState.FAILED, TaskState.SUCCEEDED]
    assert [t.state for t in final] == states
    assert final == [t for t in store.get_many(asked) if t.state.is_final]
    assert store.get(retried).state is TaskState.PENDING
    assert store.get(running).state is TaskState.RUNNING


def test_get_final_of_tasks_none_final_is_empty(store: Store) -> None:
    pending = submit_one(store)
    running = submit_one(store)
    lease(store, limit=1)

    assert store.get_final([pending, running]) == []


def test_get_final_repeats_a_repeated_id_as_get_many_does(store: Store) -> None:
    done, pending = store.submit([spec(), spec()], NOW)
    (leased,) = lease(store, limit=1)
    store.record([succeeded(leased.ref)], NOW)

    final = store.get_final([done, pending, done])

    assert [t.id for t in final] == [done, done]
    assert final == [store.get(done)] * 2


@pytest.mark.parametrize("final_ones", [0, 1])
def test_get_final_names_the_first_unknown_id_as_get_many_does(
    store: Store, final_ones: int
) -> None:
    # Given known tasks, none or one of them final, asked for with unknown ids
    known = store.submit([spec(), spec()], NOW)
    for leased in lease(store, limit=final_ones):
        store.record([succeeded(leased.ref)], NOW)
    asked = [known[0], "missing-1", known[1], "missing-2"]

    with pytest.raises(NotFound, match="missing-1") as from_get_final:
        store.get_final(asked)

    # Then the error is get_many's, word for word
    with pytest.raises(NotFound) as from_get_many:
        store.get_many(asked)
    assert str(from_get_final.value) == str(from_get_many.value)


def test_get_final_reads_more_ids_than_sqlite_takes_parameters(store: Store) -> None:
    # Given 1,200 tasks, half of them ended, asked for in a list longer than the
    # 32,766 parameters SQLite allows in one statement (and than any chunk of 1,000)
    ids = store.submit([spec()] * 1_200, NOW)
    store.record([succeeded(one.ref) for one in lease(store, limit=600)], NOW)
    asked = ids * 28

    final = store.get_final(asked)

    # Then every final one comes back, each time it was asked, and no other
    assert len(asked) > 32_766
    ended = set(ids[:600])
    assert [t.id for t in final] == [i for i in asked if i in ended]
    assert {t.state for t in final} == {TaskState.SUCCEEDED}


# lease order and filters


def test_lease_hands_out_higher_priority_first_then_fifo_across_queues(store: Store) -> None:
    low_a, high_b, low_b, high_a = store.submit(
        [
            spec(queue="a", priority=0),
            spec(queue="b", priority=5),
            spec(queue="b", priority=0),
            spec(queue="a", priority=5),
        ],
        NOW,
    )

    leases = lease(store, queues=("a", "b"))

    assert leased_ids(leases) == [high_b, high_a, low_a, low_b]


def test_lease_respects_limit_and_leaves_the_rest_pending(store: Store) -> None:
    ids = store.submit([spec() for _ in range(5)], NOW)

    first = lease(store, limit=2)
    rest = lease(store, limit=10)

    assert leased_ids(first) == ids[:2]
    assert leased_ids(rest) == ids[2:]
    assert lease(store) == []


def test_lease_only_takes_from_the_given_queues(store: Store) -> None:
    mine, other = store.submit([spec(queue="mine"), spec(queue="other")], NOW)

    leases = lease(store, queues=("mine",))

    assert leased_ids(leases) == [mine]
    assert store.get(other).state is TaskState.PENDING


def test_lease_only_takes_tasks_whose_name_is_in_names(store: Store) -> None:
    add, mul, sub = store.submit([spec("add"), spec("mul"), spec("sub")], NOW)

    wanted = lease(store, names=("add", "sub"))
    none_left = lease(store, names=("add", "sub"))

    assert leased_ids(wanted) == [add, sub]
    assert none_left == []
    assert store.get(mul).state is TaskState.PENDING
    assert leased_ids(lease(store, names=None)) == [mul]


def test_lease_finds_one_match_among_many_tasks_of_other_names(store: Store) -> None:
    store.submit([spec("other") for _ in range(20_000)], NOW)
    match = submit_one(store, name="wanted")

    leases = lease(store, names=("wanted",), limit=5)

    assert leased_ids(leases) == [match]


def test_concurrent_leases_never_hand_out_a_task_twice(store: Store) -> None:
    ids = store.submit([spec() for _ in range(200)], NOW)
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while batch := lease(store, worker=name, limit=7):
            with lock:
                taken.extend(leased_ids(batch))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(taken) == sorted(ids)


# delays


def test_not_before_in_the_future_delays_the_task(store: Store) -> None:
    later = submit_one(store, not_before=NOW + 60)

    assert lease(store) == []
    assert store.next_ready_at(NOW) == NOW + 60
    assert leased_ids(lease(store, now=NOW + 60)) == [later]
    assert store.next_ready_at(NOW + 60) is None


def test_next_ready_at_is_none_without_delayed_tasks(store: Store) -> None:
    submit_one(store)

    assert store.next_ready_at(NOW) is None


# lease and extend


def test_lease_marks_the_task_running(store: Store) -> None:
    task_id = submit_one(store)

    (leased,) = lease(store, worker="w7")

    task = store.get(task_id)
    assert leased.deadline == NOW + LEASE_S
    assert leased.ref == LeaseRef(task_id, 1)
    assert (task.state, task.attempts, task.lease) == (TaskState.RUNNING, 1, 1)
    assert (task.worker_id, task.started_at) == ("w7", NOW)
    assert leased.task == task


def test_extend_renews_the_lease_past_its_original_deadline(store: Store) -> None:
    submit_one(store)
    (leased,) = lease(store)

    stale = store.extend("w1", [leased.ref], LEASE_S, NOW + 20)

    assert stale == []
    assert store.expire(NOW + LEASE_S + 1) == []
    assert store.get(leased.task.id).state is TaskState.RUNNING
    assert [t.id for t in store.expire(NOW + 20 + LEASE_S)] == [leased.task.id]


def test_expire_reports_lapsed_tasks_by_deadline_then_submission(store: Store) -> None:
    first, second, third = store.submit([spec(), spec(), spec()], NOW)
    leases = lease(store)
    # Renewed at different times: third lapses first, then first and second together.
    store.extend("w1", [leases[2].ref], LEASE_S, NOW + 1)
    store.extend("w1", [leases[0].ref, leases[1].ref], LEASE_S, NOW + 2)

    assert store.expire(NOW + 1 + LEASE_S - 0.5) == []
    expired = store.expire(NOW + 2 + LEASE_S)

    assert [t.id for t in expired] == [third, first, second]
    assert all(store.get(t).state is TaskState.PENDING for t in (first, second, third))
    assert store.expire(NOW + 10 * LEASE_S) == []


def test_extend_reports_stale_refs(store: Store) -> None:
    kept, cancelled = store.submit([spec(), spec()], NOW)
    leases = lease(store)
    store.cancel(cancelled, NOW)
    wrong_number = LeaseRef(kept, 2)
    unknown = LeaseRef("nope", 1)

    stale = store.extend("w1", [*[one.ref for one in leases], wrong_number, unknown], 5, NOW)
    other_worker = store.extend("w2", [leases[0].ref], 5, NOW)

    assert stale == [LeaseRef(cancelled, 1), wrong_number, unknown]
    assert other_worker == [leases[0].ref]


def test_set_progress_is_fenced_by_the_lease_and_kept_once_final(store: Store) -> None:
    task_id, other_id = store.submit([spec(), spec()], NOW)
    first, other = lease(store)
    store.expire(NOW + LEASE_S + 1)  # both leases lapse: lease 1 is stale now
    (again, _) = lease(store, now=NOW + LEASE_S + 2)
    assert again.ref == LeaseRef(first.task.id, 2)

    stored = store.set_progress(
        [
            Progress(again.ref, 0.5, "half"),
            Progress(first.ref, 0.9, "stale worker"),  # ignored: lease 1 is over
            Progress(LeaseRef("nope", 1), 0.1, "unknown"),
        ]
    )
    # Only what was stored is returned: waiters never hear a stale worker's word.
    assert stored == [Progress(again.ref, 0.5, "half")]
    assert store.set_progress([Progress(LeaseRef(other_id, 1), 0.7, "stale too")]) == []

    assert (store.get(first.task.id).progress, store.get(first.task.id).progress_message) == (
        0.5,
        "half",
    )
    assert (store.get(other_id).progress, store.get(other_id).progress_message) == (0.0, "")
    store.set_progress([Progress(again.ref, 0.75, "three quarters")])
    store.record([succeeded(again.ref)], NOW + LEASE_S + 3)
    # Not RUNNING any more: ignored.
    assert store.set_progress([Progress(again.ref, 1.0, "after the end")]) == []
    final = store.get(task_id)
    assert (final.state, final.progress, final.progress_message) == (
        TaskState.SUCCEEDED,
        0.75,
        "three quarters",
    )
    assert other.task.id == other_id


# record


def test_record_succeeded_stores_the_result_and_returns_the_final_task(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)

    finished = store.record([succeeded(leased.ref, b"42")], NOW + 1)

    task = store.get(task_id)
    assert finished == [task]
    assert (task.state, task.result, task.finished_at) == (TaskState.SUCCEEDED, b"42", NOW + 1)
    assert task.result_content_type == "application/json"


def test_a_failed_attempt_with_attempts_left_comes_back_after_the_backoff(store: Store) -> None:
    task_id = submit_one(store)
    (first,) = lease(store)

    changed = store.record([failed(first.ref, max_attempts=2)], NOW)

    task = store.get(task_id)
    assert changed == [task]
    assert (task.state, task.error) == (TaskState.PENDING, BOOM)
    assert lease(store, now=NOW + 9) == []
    assert store.next_ready_at(NOW + 9) == NOW + 10
    (second,) = lease(store, now=NOW + 10)
    assert (second.task.attempts, second.task.lease) == (2, 2)
    (finished,) = store.record([failed(second.ref, max_attempts=2)], NOW + 11)
    assert (finished.state, finished.attempts) == (TaskState.FAILED, 2)


def test_a_worker_may_end_a_failure_or_name_its_retry_delay(store: Store) -> None:
    # A failure the task does not retry ends it, though attempts remain.
    ended_id, delayed_id = (submit_one(store, name=name) for name in ("ended", "delayed"))
    delayed, ended = sorted(lease(store, limit=2), key=lambda lease: lease.task.spec.name)
    assert (ended.task.id, delayed.task.id) == (ended_id, delayed_id)
    outcomes = [
        dataclasses.replace(failed(ended.ref, max_attempts=3), no_retry=True),
        dataclasses.replace(failed(delayed.ref, max_attempts=3), retry_delay_s=30.0),
    ]
    store.record(outcomes, NOW)

    assert store.get(ended_id).state is TaskState.FAILED
    # The delay it named replaces the policy's backoff of 10 s.
    assert store.get(delayed_id).state is TaskState.PENDING
    assert store.next_ready_at(NOW) == NOW + 30
    assert lease(store, now=NOW + 29) == []
    (again,) = lease(store, now=NOW + 30)
    assert again.task.id == delayed_id


def test_lost_leases_do_not_use_attempts(store: Store) -> None:
    # Given a task with two attempts whose first lease lapsed
    task_id = submit_one(store)
    lease(store)
    store.expire(NOW + LEASE_S)
    (second,) = lease(store, now=NOW + LEASE_S)

    # When the second start fails
    store.record([failed(second.ref, max_attempts=2)], NOW + LEASE_S)

    # Then it has one attempt left: only one start counted against the budget
    task = store.get(task_id)
    assert (task.state, task.attempts, task.lost_leases) == (TaskState.PENDING, 2, 1)


def test_retry_gives_a_finished_task_a_fresh_budget(store: Store) -> None:
    # Given a task that failed for good, after a lost lease
    task_id = submit_one(store)
    lease(store)
    store.expire(NOW + LEASE_S)
    (leased,) = lease(store, now=NOW + LEASE_S)
    store.record([failed(leased.ref, max_attempts=1)], NOW + LEASE_S)

    # When an operator retries it
    retried = store.retry(task_id, NOW + 100)

    # Then it is ready at once, attempts keep counting, lost leases start again
    assert retried == store.get(task_id)
    assert (retried.state, retried.attempts, retried.lost_leases) == (TaskState.PENDING, 2, 0)
    assert (retried.finished_at, retried.expires_at) == (0, 0)
    (again,) = lease(store, now=NOW + 100)
    assert again.task.attempts == 3
    changed = store.record([failed(again.ref, max_attempts=2)], NOW + 100)
    assert changed[0].state is TaskState.PENDING  # one of two fresh attempts used


def test_retry_refuses_tasks_that_have_not_ended_badly(store: Store) -> None:
    pending, running, done = store.submit([spec(), spec(), spec()], NOW)
    leases = {one.task.id: one for one in lease(store, limit=3)}
    store.release([leases[pending].ref], NOW)
    store.record([succeeded(leases[done].ref)], NOW)

    for task_id, state in ((pending, "PENDING"), (running, "RUNNING"), (done, "SUCCEEDED")):
        with pytest.raises(FailedPrecondition, match=f"{task_id} is {state}"):
            store.retry(task_id, NOW)
    with pytest.raises(NotFound, match="nope"):
        store.retry("nope", NOW)


def test_failed_without_retry_ends_the_task_with_its_error(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)

    (finished,) = store.record([failed(leased.ref)], NOW + 1)

    assert finished == store.get(task_id)
    assert (finished.state, finished.finished_at) == (TaskState.FAILED, NOW + 1)
    assert finished.error == BOOM


def test_record_cancelled_outcome_ends_the_task(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)

    (finished,) = store.record([Outcome(leased.ref, TaskState.CANCELLED)], NOW)

    assert finished.state is TaskState.CANCELLED
    assert store.get(task_id).state is TaskState.CANCELLED


def test_an_outcome_from_an_old_lease_changes_nothing(store: Store) -> None:
    task_id = submit_one(store)
    (first,) = lease(store)
    store.expire(NOW + LEASE_S)
    (second,) = lease(store, now=NOW + LEASE_S)

    ignored = store.record([succeeded(first.ref, b"old")], NOW + LEASE_S + 1)

    task = store.get(task_id)
    assert ignored == []
    assert (task.state, task.lease, task.result) == (TaskState.RUNNING, 2, b"")
    assert store.extend("w1", [second.ref], LEASE_S, NOW + LEASE_S + 1) == []


def test_the_final_state_is_written_exactly_once(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)
    store.record([succeeded(leased.ref, b"first")], NOW + 1)

    duplicates = store.record([succeeded(leased.ref, b"second"), failed(leased.ref)], NOW + 2)

    task = store.get(task_id)
    assert duplicates == []
    assert (task.state, task.result, task.finished_at) == (TaskState.SUCCEEDED, b"first", NOW + 1)


def test_one_record_applies_its_valid_outcomes_and_ignores_its_stale_ones(store: Store) -> None:
    # Given a task whose lease lapsed and was taken again, so its first ref is stale
    relet_id = submit_one(store, name="relet")
    (relet_old,) = lease(store)
    store.expire(NOW + LEASE_S)
    (relet_new,) = lease(store, now=NOW + LEASE_S)
    # And five more leased tasks, one of which is cancelled while it runs
    names = ("done", "retried", "cancelled", "ended", "stopped")
    ids = dict(zip(names, store.submit([spec(n) for n in names], NOW + LEASE_S), strict=True))
    refs = {one.task.spec.name: one.ref for one in lease(store, now=NOW + LEASE_S)}
    store.cancel(ids["cancelled"], NOW + LEASE_S)

    # When one batch brings valid, stale and repeated outcomes, mixed
    changed = store.record(
        [
            succeeded(refs["done"], b"1"),
            succeeded(relet_old.ref, b"old"),  # an earlier lease of the task
            failed(refs["retried"], max_attempts=2),
            succeeded(refs["cancelled"]),  # the task is no longer RUNNING
            failed(refs["ended"], max_attempts=1),
            succeeded(refs["done"], b"again"),  # the lease already ended above
            Outcome(refs["stopped"], TaskState.CANCELLED),
        ],
        NOW + LEASE_S + 1,
    )

    # Then the valid ones are applied and returned in the order they came, each once
    assert [(t.id, t.state) for t in changed] == [
        (ids["done"], TaskState.SUCCEEDED),
        (ids["retried"], TaskState.PENDING),
        (ids["ended"], TaskState.FAILED),
        (ids["stopped"], TaskState.CANCELLED),
    ]
    assert changed[0].result == b"1"
    # And the stale ones changed nothing
    relet = store.get(relet_id)
    assert (relet.state, relet.lease, relet.result) == (TaskState.RUNNING, relet_new.ref.lease, b"")
    cancelled = store.get(ids["cancelled"])
    assert (cancelled.state, cancelled.result) == (TaskState.CANCELLED, b"")
    assert store.get(ids["done"]).result == b"1"
    assert counts(store)["q"] == {
        TaskState.PENDING: 1,
        TaskState.RUNNING: 1,
        TaskState.SUCCEEDED: 1,
        TaskState.FAILED: 1,
        TaskState.CANCELLED: 2,
    }


def test_a_batch_with_an_outcome_that_ends_nothing_is_refused_whole(store: Store) -> None:
    first_id, second_id = store.submit([spec("a"), spec("b")], NOW)
    first, second = lease(store)

    with pytest.raises(InvalidArgument, match=rf"outcome state of task {second_id} must be"):
        store.record([succeeded(first.ref), Outcome(second.ref, TaskState.RUNNING)], NOW)

    # Nothing of it was applied: both tasks still run and take their outcomes
    assert [t.state for t in store.get_many([first_id, second_id])] == [TaskState.RUNNING] * 2
    assert len(store.record([succeeded(first.ref), succeeded(second.ref)], NOW)) == 2


# release, cancel, expire


def test_release_returns_the_task_ready_at_once_without_counting_the_attempt(
    store: Store,
) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)

    released = store.release([leased.ref, LeaseRef(task_id, 7)], NOW + 1)

    task = store.get(task_id)
    assert released == 1
    assert (task.state, task.attempts) == (TaskState.PENDING, 0)
    (again,) = lease(store, now=NOW + 1)
    assert (again.task.attempts, again.task.lease) == (1, 2)
    assert store.release([leased.ref], NOW + 2) == 0


def test_cancel_pending_task_is_never_leased(store: Store) -> None:
    task_id = submit_one(store)

    (cancelled,) = store.cancel(task_id, NOW + 1)

    assert (cancelled.state, cancelled.finished_at) == (TaskState.CANCELLED, NOW + 1)
    assert store.get(task_id) == cancelled
    assert lease(store, now=NOW + 2) == []


def test_cancel_delayed_task_is_never_leased(store: Store) -> None:
    task_id = submit_one(store, not_before=NOW + 5)

    store.cancel(task_id, NOW)

    assert store.next_ready_at(NOW) is None
    assert lease(store, now=NOW + 10) == []


def test_cancel_running_task_makes_its_lease_stale(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)

    (cancelled,) = store.cancel(task_id, NOW + 1)

    assert cancelled.state is TaskState.CANCELLED
    assert store.extend("w1", [leased.ref], LEASE_S, NOW + 2) == [leased.ref]
    assert store.record([succeeded(leased.ref)], NOW + 3) == []
    assert store.get(task_id) == cancelled
    assert store.expire(NOW + 2 * LEASE_S) == []


def test_cancel_of_a_final_task_raises_failed_precondition(store: Store) -> None:
    task_id = submit_one(store)
    (leased,) = lease(store)
    store.record([succeeded(leased.ref)], NOW)

    with pytest.raises(FailedPrecondition, match=task_id):
        store.cancel(task_id, NOW + 1)
    assert store.get(task_id).state is TaskState.SUCCEEDED


def test_expire_returns_lapsed_tasks_to_pending_with_the_attempt_counted(store: Store) -> None:
    early, late = store.submit([spec(), spec()], NOW)
    lease(store, limit=1)
    lease(store, limit=1, now=NOW + 10)

    expired = store.expire(NOW + LEASE_S)

    assert [(t.id, t.state, t.attempts) for t in expired] == [(early, TaskState.PENDING, 1)]
    assert store.get(late).state is TaskState.RUNNING
    (again,) = lease(store, now=NOW + LEASE_S)
    assert (again.task.id, again.task.attempts, again.task.lease) == (early, 2, 2)


# idempotency


def test_a_repeated_idempotency_key_returns_the_first_task(store: Store) -> None:
    (first,) = store.submit([spec(idempotency_key="order-1")], NOW)

    again = store.submit(
        [spec(idempotency_key="order-1"), spec(idempotency_key="order-2"), spec()], NOW + 1
    )
    twice_in_a_batch = store.submit(
        [spec(idempotency_key="order-3"), spec(idempotency_key="order-3")], NOW + 2
    )

    assert again[0] == first
    assert twice_in_a_batch[0] == twice_in_a_batch[1]
    assert len({first, *again, *twice_in_a_batch}) == 4
    assert counts(store)["q"][TaskState.PENDING] == 4


# stats


def test_stats_count_every_state_per_queue(store: Store) -> None:
    assert store.stats() == []
    a1, a2, a3, a4, a5, b1 = store.submit([*[spec(queue="a") for _ in range(5)], spec("b")], NOW)
    leases = {one.task.id: one.ref for one in lease(store, queues=("a",), limit=4)}
    store.record([succeeded(leases[a1]), failed(leases[a2])], NOW)
    store.record([failed(leases[a3], max_attempts=2)], NOW)
    store.cancel(a5, NOW)

    stats = store.stats()

    assert [c.queue for c in stats] == ["a", "q"]
    assert counts(store) == {
        "a": {
            TaskState.PENDING: 1,
            TaskState.RUNNING: 1,
            TaskState.SUCCEEDED: 1,
            TaskState.FAILED: 1,
            TaskState.CANCELLED: 1,
        },
        "q": {state: int(state is TaskState.PENDING) for state in TaskState},
    }
    assert store.get(a4).state is TaskState.RUNNING
    assert store.get(b1).state is TaskState.PENDING


def test_stats_follow_every_call_that_adds_ends_moves_or_deletes_tasks(store: Store) -> None:
    # The SQL stores keep stats in a table of their own, changed by each write
    # method (SQLite) or trigger (PostgreSQL): after every call they must equal
    # the tasks as listed.
    def check() -> None:
        listed: dict[str, dict[TaskState, int]] = {}
        for task in store.list_tasks(TaskQuery(), 1_000).tasks:
            listed.setdefault(task.spec.queue, dict.fromkeys(TaskState, 0))[task.state] += 1
        assert counts(store) == listed

    def held(queues: tuple[str, ...], now: float = NOW) -> dict[str, LeaseRef]:
        return {one.task.id: one.ref for one in lease(store, queues=queues, now=now)}

    check()
    a, b, c, d, e = store.submit([spec(), spec(), spec(), spec(), spec(queue="b")], NOW)
    store.submit([spec(idempotency_key="k"), spec(idempotency_key="k")], NOW)
    check()
    with pytest.raises(InvalidArgument):  # refused whole: nothing counted
        store.submit([spec(queue="x"), spec(queue="x", depends_on=("nope",))], NOW)
    check()
    parent, child, _, _ = store.submit(
        [
            spec(queue="p"),
            spec(queue="c", depends_on=("$0",)),
            spec(queue="c", depends_on=("$1",)),
            spec(queue="c", depends_on=(e,)),
        ],
        NOW,
    )
    check()
    refs = held(("q", "b", "p"))
    assert len(refs) == 7  # with the idempotent one
    check()
    store.record([succeeded(refs[parent])], NOW)  # readies the child
    check()
    store.record([succeeded(refs[a]), failed(refs[b], max_attempts=2)], NOW)  # b runs again
    check()
    store.record([failed(held(("c",))[child])], NOW)  # and cancels the grandchild
    check()
    store.cancel(b, NOW)  # pending
    check()
    store.cancel(c, NOW)  # running
    check()
    assert store.release([refs[d], refs[d]], NOW) == 1
    check()
    now = NOW
    for _ in range(POLICY.max_lost_leases + 1):  # e ends WorkerLost, cancelling its child
        now += LEASE_S
        store.expire(now)
        check()
        held(("b",), now)
        check()
    assert store.get(e).state is TaskState.FAILED
    store.retry(e, now)
    store.retry(c, now)
    check()
    schedule = store.add_schedule(Schedule("", spec(queue="s"), interval_s=60.0, next_fire=now))
    fired = FiredTick(now, spec(queue="s"))
    assert store.fire_schedule(schedule.id, now, now + 60.0, fired, now) is not None
    check()
    assert store.purge(TaskQuery(queue="p"), 10) == 1  # the queue's last task
    check()
    assert store.prune(now + 2 * POLICY.result_ttl_s, 100) == 5
    check()


def test_oldest_pending_is_when_the_longest_waiting_ready_task_became_ready(
    store: Store,
) -> None:
    assert store.oldest_pending(NOW) == {}
    # Given per queue tasks that became ready at different times; a higher priority
    # makes a newer task first in line, not older
    store.submit([spec(queue="a")], NOW)
    store.submit([spec(queue="a", priority=9)], NOW + 5)
    store.submit([spec(queue="b")], NOW + 3)

    # Then each queue's figure is its earliest ready time
    assert store.oldest_pending(NOW + 10) == {"a": NOW, "b": NOW + 3}

    # When the older task of a is leased, a's next one is the oldest; b's lease
    # leaves b nothing ready (a RUNNING task does not count)
    first = lease(store, now=NOW + 10, queues=("a",))
    assert len(first) == 2
    (b_lease,) = lease(store, now=NOW + 10, queues=("b",))
    assert store.oldest_pending(NOW + 10) == {}

    # A task given back waits from then on; so does one whose lease lapsed
    store.release([first[0].ref], NOW + 12)
    store.record([succeeded(first[1].ref)], NOW + 12)
    store.expire(b_lease.deadline + 1)
    assert store.oldest_pending(NOW + 50) == {"a": NOW + 12, "b": b_lease.deadline + 1}

    # A cancelled task no longer counts
    store.cancel(first[0].task.id, NOW + 60)
    assert store.oldest_pending(NOW + 60) == {"b": b_lease.deadline + 1}


def test_oldest_pending_leaves_out_delayed_and_waiting_tasks_until_they_are_ready(
    store: Store,
) -> None:
    # Given a task delayed to NOW + 20, one that waits for a parent, and a ready
    # one submitted at NOW + 5
    delayed = submit_one(store, queue="d", not_before=NOW + 20)
    (parent, child) = store.submit([spec("p", queue="p"), spec(depends_on=("$0",))], NOW)
    store.submit([spec("other")], NOW + 5)

    # Then the delayed one counts once due, from its due time on (though no lease
    # has noticed it yet), and the waiting one not at all
    assert store.oldest_pending(NOW + 19) == {"q": NOW + 5, "p": NOW}
    assert store.oldest_pending(NOW + 30) == {"q": NOW + 5, "p": NOW, "d": NOW + 20}
    assert leased_ids(lease(store, now=NOW + 30, queues=("d",))) == [delayed]

    # When the parent succeeds at NOW + 40, the child waits from then
    (parent_lease,) = lease(store, now=NOW + 35, queues=("p",))
    assert parent_lease.task.id == parent
    store.record([succeeded(parent_lease.ref)], NOW + 40)
    assert store.oldest_pending(NOW + 41) == {"q": NOW + 5}
    lease(store, now=NOW + 41, names=("other",))
    assert store.oldest_pending(NOW + 41) == {"q": NOW + 40}

    # A failed attempt waits its backoff (10 s), then counts from its end
    (retrying,) = lease(store, now=NOW + 50)
    assert retrying.task.id == child
    store.record([failed(retrying.ref, max_attempts=2)], NOW + 50)
    assert store.oldest_pending(NOW + 55) == {}
    assert store.oldest_pending(NOW + 70) == {"q": NOW + 60}


def test_oldest_pending_follows_a_long_stream_of_tasks(store: Store) -> None:
    # Given 3,000 tasks submitted a second apart, of which all but the last 10 ran
    for i in range(3_000):
        store.submit([spec()], NOW + i)
    for _ in range(3):
        for one in lease(store, now=NOW + 4_000, limit=1_000):
            if one.task.created_at < NOW + 2_990:
                store.record([succeeded(one.ref)], NOW + 4_000)
            else:
                store.release([one.ref], NOW + 4_000 + one.task.created_at - NOW)

    # Then the oldest is the first of those given back, and more submits keep it
    assert store.oldest_pending(NOW + 10_000) == {"q": NOW + 6_990}
    store.submit([spec() for _ in range(2_000)], NOW + 9_000)
    assert store.oldest_pending(NOW + 10_000) == {"q": NOW + 6_990}


# open_store


def test_open_store_understands_memory_and_sqlite_urls(tmp_path: Path) -> None:
    memory = open_store("memory")
    sqlite = open_store(f"sqlite:{tmp_path / 'a.db'}")

    assert isinstance(memory, MemoryStore)
    assert isinstance(sqlite, SqliteStore)
    sqlite.close()


@pytest.mark.parametrize("url", ["", "redis://x", "sqlite:", "Memory"])
def test_open_store_refuses_other_urls_naming_the_flag(url: str) -> None:
    with pytest.raises(ConfigError, match="--store"):
        open_store(url)


def test_open_store_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)

    with pytest.raises(ConfigError, match="--store"):
        open_store(f"sqlite:{junk}")


# sqlite durability


def test_a_reopened_sqlite_store_keeps_every_task_and_the_stats(tmp_path: Path) -> None:
    path = str(tmp_path / "tasks.db")
    first = SqliteStore(path)
    pending, running, done = first.submit([spec(), spec(), spec(idempotency_key="k")], NOW)
    leases = {one.task.id: one for one in lease(first, limit=3)}
    first.release([leases[pending].ref], NOW)
    first.record([succeeded(leases[done].ref, b"7")], NOW)
    before = first.get_many([pending, running, done])
    stats_before = first.stats()
    first.close()

    reopened = SqliteStore(path)
    try:
        assert reopened.get_many([pending, running, done]) == before
        assert reopened.stats() == stats_before
        assert reopened.submit([spec(idempotency_key="k")], NOW) == [done]
        assert reopened.extend("w1", [leases[running].ref], LEASE_S, NOW + 1) == []
        expired = reopened.expire(NOW + 1 + LEASE_S)
        assert [(t.id, t.lease) for t in expired] == [(running, 1)]
        assert leased_ids(lease(reopened, now=NOW + 100)) == [pending, running]
    finally:
        reopened.close()


def test_an_acknowledged_submit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    script = f"""
import os, signal
from taskfleet.common.model import TaskSpec
from taskfleet.master.store import SqliteStore
store = SqliteStore({str(path)!r})
print(store.submit([TaskSpec(name="add", queue="q")], {NOW})[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    task_id = child.stdout.strip()

    reopened = SqliteStore(str(path))
    try:
        task: Task = reopened.get(task_id)
        assert task.state is TaskState.PENDING
    finally:
        reopened.close()
    assert child.returncode == -9


def test_sqlite_stats_match_the_tasks_after_a_kill_9_mid_batch(tmp_path: Path) -> None:
    # Given a process that submits, leases and records batches without pause
    path = tmp_path / "tasks.db"
    script = f"""
import itertools
from taskfleet.common.model import Outcome, TaskSpec, TaskState
from taskfleet.master.store import SqliteStore
store = SqliteStore({str(path)!r})
for round in itertools.count():
    store.submit([TaskSpec(name="add", queue=f"q{{round % 3}}") for _ in range(50)], {NOW})
    leases = store.lease("w", ["q0", "q1", "q2"], None, 40, 30.0, {NOW})
    store.record([Outcome(one.ref, TaskState.SUCCEEDED, result=b"1") for one in leases], {NOW})
    if round == 3:
        print("busy", flush=True)
"""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "busy\n"
        finally:
            child.kill()  # SIGKILL, somewhere in a batch
            child.wait(timeout=60)
    assert child.returncode == -9

    # Then the reopened file's stats count exactly the tasks it holds
    reopened = SqliteStore(str(path))
    try:
        listed: dict[str, dict[TaskState, int]] = {}
        for task in reopened.list_tasks(TaskQuery(), 1_000_000).tasks:
            listed.setdefault(task.spec.queue, dict.fromkeys(TaskState, 0))[task.state] += 1
        assert counts(reopened) == listed
        assert sum(n for queue in listed.values() for n in queue.values()) >= 200
    finally:
        reopened.close()


def test_a_sqlite_file_serves_one_store_at_a_time(tmp_path: Path) -> None:
    # Given a SQLite store open on a file, as a master holds it
    path = str(tmp_path / "one.db")
    first = SqliteStore(path)
    try:
        # When a second one opens the same file, it is refused, naming the file
        with pytest.raises(ConfigError, match="in use by another master"):
            SqliteStore(path)
        with pytest.raises(ConfigError, match=r"one\.db"):
            open_store(f"sqlite:{path}")
    finally:
        first.close()

    # Then once the first is closed the file opens again
    SqliteStore(path).close()


def test_pending_names_counts_pending_tasks_per_queue_and_name(store: Store) -> None:
    specs = [spec("a", "q")] * 3 + [spec("b", "q"), spec("a", "r"), spec("a", "r")]
    store.submit(specs, NOW)
    store.submit([spec("later", "q", not_before=NOW + 60)], NOW)  # delayed is pending too
    lease(store, queues=("q",), names=("a",), limit=1)  # running is not

    assert store.pending_names(10) == [
        PendingName("q", "a", 2),
        PendingName("r", "a", 2),
        PendingName("q", "b", 1),
        PendingName("q", "later", 1),
    ]
    assert store.pending_names(2) == [PendingName("q", "a", 2), PendingName("r", "a", 2)]


def test_a_spec_keeps_its_start_by_time_and_a_cancel_may_say_why(store: Store) -> None:
    task_id = submit_one(store, expires_at=NOW + 5.5)
    assert store.get(task_id).spec.expires_at == NOW + 5.5
    (leased,) = lease(store)
    assert leased.task.spec.expires_at == NOW + 5.5

    why = TaskError("Expired", "not started in time")
    (ended,) = store.record([Outcome(leased.ref, TaskState.CANCELLED, error=why)], NOW)
    assert (ended.state, ended.error) == (TaskState.CANCELLED, why)
    assert store.get(task_id).error == why


# dependencies (store/deps.py)


def args_of(task: Task) -> list[Any]:
    return list(json.loads(task.spec.payload)["args"])


def test_a_child_waits_for_its_parent_and_gets_its_result(store: Store) -> None:
    # Given a parent and a child passed its result, submitted together
    parent, child = store.submit(
        [
            spec("a"),
            spec("b", payload=b'{"args":[10],"kwargs":{}}', depends_on=("$0",), pass_results=True),
        ],
        NOW,
    )
    assert store.get(child).state is TaskState.PENDING
    assert store.get(child).spec.depends_on == (parent,)
    assert store.next_ready_at(NOW) is None
    # Only the parent is handed out
    (leased,) = lease(store)
    assert leased.task.id == parent
    assert lease(store) == []

    # When the parent succeeds, the record reports the child as readied
    changed = store.record([succeeded(leased.ref, b"[1, 2]")], NOW + 1)

    assert [(t.id, t.state) for t in changed] == [
        (parent, TaskState.SUCCEEDED),
        (child, TaskState.PENDING),
    ]
    (next_lease,) = lease(store, now=NOW + 1)
    assert next_lease.task.id == child
    assert args_of(next_lease.task) == [[1, 2], 10]


def test_a_child_of_several_parents_runs_after_the_last_with_results_in_order(
    store: Store,
) -> None:
    first, second, callback = store.submit(
        [spec("a"), spec("a"), spec("sum", depends_on=("$1", "$0"), pass_results=True)], NOW
    )
    by_id = {lease_.task.id: lease_.ref for lease_ in lease(store)}
    assert set(by_id) == {first, second}

    assert [t.id for t in store.record([succeeded(by_id[first], b"1")], NOW)] == [first]
    assert lease(store) == []
    store.record([succeeded(by_id[second], b"2")], NOW)

    (leased,) = lease(store)
    assert leased.task.id == callback
    assert args_of(leased.task) == [2, 1]


def test_a_parent_purged_before_its_child_is_readied_passes_no_result(store: Store) -> None:
    # Given a child of two parents, the first finished and then purged
    first, second, callback = store.submit(
        [spec("a"), spec("b", queue="r"), spec("sum", depends_on=("$0", "$1"), pass_results=True)],
        NOW,
    )
    (leased,) = lease(store)
    assert leased.task.id == first
    store.record([succeeded(leased.ref, b"1")], NOW)
    assert store.purge(TaskQuery(queue="q", states=frozenset({TaskState.SUCCEEDED})), 10) == 1

    # When the second parent succeeds
    (leased,) = lease(store, queues=("r",))
    assert leased.task.id == second
    store.record([succeeded(leased.ref, b"2")], NOW)

    # Then the child runs, with null for the result no longer kept
    (leased,) = lease(store)
    assert leased.task.id == callback
    assert args_of(leased.task) == [None, 2]


def test_a_parent_that_already_succeeded_counts_as_done(store: Store) -> None:
    parent = submit_one(store)
    (leased,) = lease(store)
    store.record([succeeded(leased.ref, b'"x"')], NOW)

    (child,) = store.submit([spec("b", depends_on=(parent,), pass_results=True)], NOW)

    (leased,) = lease(store)
    assert leased.task.id == child
    assert args_of(leased.task) == ["x"]


def test_a_failed_parent_cancels_its_dependents_transitively_at_once(store: Store) -> None:
    # Given a parent, two children and a grandchild waiting for one of them
    parent, child, other, grandchild, free = store.submit(
        [
            spec("a"),
            spec("b", depends_on=("$0",)),
            spec("b", depends_on=("$0",)),
            spec("c", depends_on=("$1",)),
            spec("d"),
        ],
        NOW,
    )
    (leased,) = lease(store, names=("a",))

    # When the parent fails for good
    changed = store.record([failed(leased.ref)], NOW + 1)

    # Then the record reports the whole tree CANCELLED ParentFailed
    assert changed[0].id == parent and changed[0].state is TaskState.FAILED
    ended = {t.id: t for t in changed[1:]}
    assert set(ended) == {child, other, grandchild}
    for task in ended.values():
        assert task.state is TaskState.CANCELLED
        assert task.error is not None and task.error.type == "ParentFailed"
        assert task.finished_at == NOW + 1
    assert ended[grandchild].error.message == f"parent task {child} ended CANCELLED"
    assert store.get(grandchild).state is TaskState.CANCELLED
    assert store.get(free).state is TaskState.PENDING
    # and retrying the parent leaves them cancelled
    store.retry(parent, NOW + 2)
    assert store.get(child).state is TaskState.CANCELLED


def test_cancelling_a_parent_returns_the_dependents_it_cancelled(store: Store) -> None:
    parent, child, grandchild = store.submit(
        [spec("a"), spec("b", depends_on=("$0",)), spec("c", depends_on=("$1",))], NOW
    )

    cancelled = store.cancel(parent, NOW)

    assert [(t.id, t.state) for t in cancelled] == [
        (parent, TaskState.CANCELLED),
        (child, TaskState.CANCELLED),
        (grandchild, TaskState.CANCELLED),
    ]
    assert counts(store)["q"][TaskState.CANCELLED] == 3


def test_unknown_or_failed_parents_refuse_the_whole_batch_naming_the_field(
    store: Store,
) -> None:
    gone = submit_one(store)
    store.cancel(gone, NOW)
    before = counts(store)

    with pytest.raises(InvalidArgument, match=r"tasks\[1\]\.depends_on\[1\]: no task 0123"):
        store.submit([spec(), spec(depends_on=("$0", "0123"))], NOW)
    with pytest.raises(FailedPrecondition, match=rf"tasks\[0\]\.depends_on\[0\]: task {gone}"):
        store.submit([spec(depends_on=(gone,))], NOW)

    assert counts(store) == before


def test_parents_that_succeed_in_one_record_ready_their_child(store: Store) -> None:
    first, second, callback = store.submit(
        [spec("a"), spec("a"), spec("sum", depends_on=("$0", "$1"), pass_results=True)], NOW
    )
    refs = {lease_.task.id: lease_.ref for lease_ in lease(store)}

    changed = store.record([succeeded(refs[first], b"1"), succeeded(refs[second], b"2")], NOW)

    assert [t.id for t in changed if t.state is TaskState.PENDING] == [callback]
    (leased,) = lease(store)
    assert args_of(leased.task) == [1, 2]


def test_gather_results_passes_the_parents_results_as_one_list(store: Store) -> None:
    parents = [spec("square") for _ in range(3)]
    callback = spec("sum", depends_on=("$0", "$1", "$2"), gather_results=True)
    *parent_ids, callback_id = store.submit([*parents, callback], NOW)
    refs = {lease_.task.id: lease_.ref for lease_ in lease(store)}
    for i, parent in enumerate(parent_ids):
        store.record([succeeded(refs[parent], str(i * i).encode())], NOW)

    (leased,) = lease(store)

    assert leased.task.id == callback_id
    assert args_of(leased.task) == [[0, 1, 4]]
    assert leased.task.spec.gather_results and not leased.task.spec.pass_results


def test_a_parent_with_thousands_of_children_readies_them_all(store: Store) -> None:
    _parent, *children = store.submit(
        [spec("a"), *(spec("b", depends_on=("$0",)) for _ in range(2_500))], NOW
    )
    (leased,) = lease(store, names=("a",))

    changed = store.record([succeeded(leased.ref)], NOW)

    assert sorted(t.id for t in changed[1:]) == sorted(children)
    assert len(lease(store, names=("b",), limit=3_000)) == 2_500


def test_a_parent_lost_too_often_cancels_its_dependents_in_the_same_expire(store: Store) -> None:
    parent, child = store.submit([spec("a"), spec("b", depends_on=("$0",))], NOW)
    now = NOW
    for _ in range(POLICY.max_lost_leases + 1):
        assert leased_ids(lease(store, now=now)) == [parent]
        now += LEASE_S + 1
        lapsed = store.expire(now)

    assert [(t.id, t.state) for t in lapsed] == [
        (parent, TaskState.FAILED),
        (child, TaskState.CANCELLED),
    ]
    assert lapsed[0].error is not None and lapsed[0].error.type == "WorkerLost"
    assert lapsed[1].error is not None and lapsed[1].error.type == "ParentFailed"


def test_a_result_that_is_not_json_is_passed_as_its_text(store: Store) -> None:
    # A worker not written in Python may answer in another content type; the
    # parent's outcome must still be recorded, and the child gets the text.
    parent, child = store.submit([spec("a"), spec("b", depends_on=("$0",), pass_results=True)], NOW)
    (leased,) = lease(store)
    outcome = Outcome(
        leased.ref, TaskState.SUCCEEDED, result=b"plain", result_content_type="text/plain"
    )

    store.record([outcome], NOW)

    assert store.get(parent).state is TaskState.SUCCEEDED
    (leased,) = lease(store)
    assert (leased.task.id, args_of(leased.task)) == (child, ["plain"])


def test_results_too_large_to_pass_fail_the_child_and_cancel_its_dependents(
    store: Store,
) -> None:
    big = b'"' + b"x" * (13 * 1024 * 1024) + b'"'  # two of them are over 24 MiB
    first, second, child, grandchild = store.submit(
        [
            spec("a"),
            spec("a"),
            spec("b", depends_on=("$0", "$1"), pass_results=True),
            spec("c", depends_on=("$2",)),
        ],
        NOW,
    )
    refs = {lease_.task.id: lease_.ref for lease_ in lease(store)}

    changed = store.record([succeeded(refs[first], big), succeeded(refs[second], big)], NOW)

    ended = {t.id: t for t in changed[2:]}
    assert set(ended) == {child, grandchild}
    assert ended[child].state is TaskState.FAILED
    assert ended[child].error is not None and ended[child].error.type == "ArgumentsTooLarge"
    assert ended[grandchild].state is TaskState.CANCELLED
    assert lease(store) == []
    # A new task on those finished parents is refused at submit
    with pytest.raises(ResourceExhausted, match=r"tasks\[0\]\.depends_on: its parents' results"):
        store.submit([spec("b", depends_on=(first, second), pass_results=True)], NOW)


# concurrency keys (master/concurrency.py)


def test_running_by_key_counts_running_tasks_per_key_with_the_smallest_limit(
    store: Store,
) -> None:
    store.submit(
        [
            spec(concurrency_key="a", concurrency_limit=3),
            spec(concurrency_key="a", concurrency_limit=2),
            spec(concurrency_key="b", concurrency_limit=1),
            spec(concurrency_key="b", concurrency_limit=1),
            spec(),
        ],
        NOW,
    )
    assert store.running_by_key() == {}
    leases = lease(store, limit=4)  # a, a, b, b: the unkeyed task stays PENDING
    assert [one.task.spec.concurrency_key for one in leases] == ["a", "a", "b", "b"]
    assert leases[1].task.spec.concurrency_limit == 2  # kept through the store
    loads = store.running_by_key()
    assert {key: (load.running, load.limit) for key, load in loads.items()} == {
        "a": (2, 2),
        "b": (2, 1),
    }
    store.record([succeeded(leases[0].ref)], NOW + 1)
    assert store.release([leases[2].ref, leases[3].ref], NOW + 1) == 2
    loads = store.running_by_key()
    assert {key: (load.running, load.limit) for key, load in loads.items()} == {"a": (1, 2)}


def test_lease_passes_over_excluded_keys_and_leaves_their_tasks_ready(store: Store) -> None:
    busy = store.submit([spec(concurrency_key="busy", concurrency_limit=1)] * 5, NOW)
    other = store.submit(
        [spec(concurrency_key="other", concurrency_limit=1), spec(priority=-1)], NOW
    )
    leases = store.lease("w1", ("q",), None, 2, LEASE_S, NOW, exclude_keys={"busy"})
    assert leased_ids(leases) == other
    by_name = store.lease("w1", ("q",), ["add"], 9, LEASE_S, NOW, exclude_keys={"other"})
    assert leased_ids(by_name) == busy  # still ready, in their order
