"""The Store contract for a task's end of life, run against every store: lost
leases that are counted and capped, finished tasks pruned after their TTL,
purge, and keyset-paged listing."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.errors import InvalidArgument, NotFound
from taskfleet.common.model import LeaseRef, Outcome, TaskError, TaskSpec, TaskState
from taskfleet.master.store import SqliteStore, Store, StorePolicy, TaskQuery, open_store
from taskfleet.master.store.sqlite_schema import MIGRATIONS
from taskfleet.master.store.sqlite_sql import INSERT, task_row

from pg import store_url

NOW = 1_000_000.0
LEASE_S = 30.0
TTL_S = 60.0
BOOM = TaskError("ValueError", "boom")
OpenStore = Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def open_with(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store of each kind with the policy given; closed at teardown."""
    opened: list[Store] = []
    with store_url(request.param, tmp_path) as url:

        def open_one(**policy: Any) -> Store:
            store = open_store(url, StorePolicy(**policy))
            opened.append(store)
            return store

        yield open_one
        for store in opened:
            store.close()


def spec(name: str = "add", queue: str = "q", **options: Any) -> TaskSpec:
    return TaskSpec(name=name, queue=queue, **options)


def run_and_lose(store: Store, now: float, worker: str) -> list[TaskState]:
    """Lease every ready task to ``worker`` and let the leases lapse."""
    store.lease(worker, ["q"], None, 100, LEASE_S, now)
    return [t.state for t in store.expire(now + LEASE_S)]


def finish(store: Store, task_ids: list[str], now: float, state: TaskState) -> None:
    """End ``task_ids`` (ready tasks of queue q) in ``state``; other tasks stay as they were."""
    leases = store.lease("w", ["q"], None, 1000, LEASE_S, now)
    ours = [one for one in leases if one.task.id in task_ids]
    assert len(ours) == len(task_ids)
    error = BOOM if state is TaskState.FAILED else None
    store.record([Outcome(one.ref, state, result=b"1", error=error) for one in ours], now)
    store.release([one.ref for one in leases if one.task.id not in task_ids], now)


def counts(store: Store) -> dict[TaskState, int]:
    return {c.queue: c.counts for c in store.stats()}.get("q", {})


# lost leases


def test_a_task_that_loses_its_worker_too_often_ends_failed_worker_lost(
    open_with: OpenStore,
) -> None:
    # Given a store that tolerates two lost leases
    store = open_with(max_lost_leases=2)
    (task_id,) = store.submit([spec()], NOW)

    # When its worker is lost three times
    states = [run_and_lose(store, NOW + i * 100, f"w{i}") for i in range(3)]

    # Then the first two lapses put it back and the third ends it, naming the workers
    assert states == [[TaskState.PENDING], [TaskState.PENDING], [TaskState.FAILED]]
    task = store.get(task_id)
    assert (task.state, task.lost_leases, task.attempts) == (TaskState.FAILED, 3, 3)
    assert task.error is not None and task.error.type == "WorkerLost"
    assert "3 times" in task.error.message and "w0, w1, w2" in task.error.message
    assert task.finished_at == NOW + 200 + LEASE_S
    assert counts(store)[TaskState.FAILED] == 1
    assert store.lease("w9", ["q"], None, 10, LEASE_S, NOW + 1000) == []


def test_max_lost_leases_zero_fails_a_task_at_its_first_lost_lease(open_with: OpenStore) -> None:
    store = open_with(max_lost_leases=0)
    (task_id,) = store.submit([spec()], NOW)

    assert run_and_lose(store, NOW, "w1") == [TaskState.FAILED]
    assert store.get(task_id).lost_leases == 1


def test_a_lease_given_back_or_finished_is_not_a_lost_one(open_with: OpenStore) -> None:
    store = open_with(max_lost_leases=0)
    released, done = store.submit([spec(), spec()], NOW)
    leases = {one.task.id: one for one in store.lease("w", ["q"], None, 2, LEASE_S, NOW)}
    store.release([leases[released].ref], NOW)
    store.record([Outcome(leases[done].ref, TaskState.SUCCEEDED, result=b"1")], NOW)

    assert store.expire(NOW + 2 * LEASE_S) == []
    assert [t.lost_leases for t in store.get_many([released, done])] == [0, 0]


# retention


def test_finished_tasks_are_pruned_after_the_ttl_with_their_keys(open_with: OpenStore) -> None:
    # Given tasks that ended in every way, one still pending and one with its own TTL
    store = open_with(result_ttl_s=TTL_S)
    ok, bad, gone, waiting, kept_longer = store.submit(
        [
            spec(idempotency_key="k-ok"),
            spec(),
            spec(),
            spec(name="later", queue="other"),
            spec(result_ttl_s=10 * TTL_S),
        ],
        NOW,
    )
    finish(store, [ok, kept_longer], NOW, TaskState.SUCCEEDED)
    finish(store, [bad], NOW, TaskState.FAILED)
    store.cancel(gone, NOW)
    assert store.get(ok).expires_at == NOW + TTL_S
    assert store.get(kept_longer).expires_at == NOW + 10 * TTL_S
    assert store.get(waiting).expires_at == 0

    # When pruning runs before and after the TTL, in bounded steps
    assert store.prune(NOW + TTL_S - 1, 10) == 0
    assert store.prune(NOW + TTL_S, 2) == 2
    assert store.prune(NOW + TTL_S, 2) == 1
    assert store.prune(NOW + TTL_S, 2) == 0

    # Then the three are gone, with their idempotency key, and counted out
    for task_id in (ok, bad, gone):
        with pytest.raises(NotFound, match="result TTL"):
            store.get(task_id)
    assert store.get(waiting).state is TaskState.PENDING
    assert store.get(kept_longer).state is TaskState.SUCCEEDED
    assert store.submit([spec(idempotency_key="k-ok")], NOW + TTL_S) != [ok]
    assert counts(store)[TaskState.SUCCEEDED] == 1
    assert counts(store)[TaskState.FAILED] == 0
    assert counts(store)[TaskState.CANCELLED] == 0


def test_a_zero_ttl_keeps_finished_tasks_forever(open_with: OpenStore) -> None:
    store = open_with(result_ttl_s=0)
    (task_id,) = store.submit([spec()], NOW)
    finish(store, [task_id], NOW, TaskState.SUCCEEDED)

    assert store.get(task_id).expires_at == 0
    assert store.prune(NOW + 10**9, 100) == 0
    assert store.get(task_id).state is TaskState.SUCCEEDED


def test_a_task_failed_by_lost_leases_expires_too(open_with: OpenStore) -> None:
    store = open_with(max_lost_leases=0, result_ttl_s=TTL_S)
    (task_id,) = store.submit([spec()], NOW)
    run_and_lose(store, NOW, "w1")

    assert store.prune(NOW + LEASE_S + TTL_S, 10) == 1
    with pytest.raises(NotFound):
        store.get(task_id)


def test_a_pruned_task_leaves_no_trace_in_leasing_or_expiry(open_with: OpenStore) -> None:
    # Given a task cancelled while queued and one cancelled while running, both pruned
    store = open_with(result_ttl_s=TTL_S)
    queued, running, other = store.submit([spec(), spec(), spec(name="other")], NOW)
    store.lease("w", ["q"], ["add"], 1, LEASE_S, NOW)
    store.cancel(queued, NOW)
    store.cancel(running, NOW)
    assert store.prune(NOW + TTL_S, 10) == 2

    # Then leasing and expiring step over them
    assert store.expire(NOW + TTL_S + LEASE_S) == []
    leased = store.lease("w", ["q"], None, 10, LEASE_S, NOW + TTL_S)
    assert [one.task.id for one in leased] == [other]


# purge


def test_purge_deletes_matching_finished_tasks_only(open_with: OpenStore) -> None:
    store = open_with()
    failed_q, failed_r, ok_q, pending_q = store.submit(
        [spec(), spec(queue="r"), spec(), spec()], NOW
    )
    finish(store, [failed_q], NOW, TaskState.FAILED)
    leases = store.lease("w", ["r"], None, 1, LEASE_S, NOW)
    store.record([Outcome(leases[0].ref, TaskState.FAILED, error=BOOM)], NOW)
    finish(store, [ok_q], NOW, TaskState.SUCCEEDED)

    assert store.purge(TaskQuery(queue="q", states=frozenset({TaskState.FAILED})), 100) == 1
    with pytest.raises(NotFound):
        store.get(failed_q)
    assert store.get(failed_r).state is TaskState.FAILED
    assert store.purge(TaskQuery(queue="q"), 100) == 1  # every final state
    assert store.get(pending_q).state is TaskState.PENDING
    assert counts(store) == dict.fromkeys(TaskState, 0) | {TaskState.PENDING: 1}
    assert store.purge(TaskQuery(queue="r"), 100) == 1
    assert [c.queue for c in store.stats()] == ["q"]  # r is empty now


def test_purge_refuses_unfinished_states(open_with: OpenStore) -> None:
    store = open_with()
    store.submit([spec()], NOW)

    for state in (TaskState.PENDING, TaskState.RUNNING):
        with pytest.raises(InvalidArgument, match="states"):
            store.purge(TaskQuery(states=frozenset({state, TaskState.FAILED})), 100)
    assert counts(store)[TaskState.PENDING] == 1


# listing


def test_list_tasks_pages_newest_first_with_filters(open_with: OpenStore) -> None:
    store = open_with()
    ids = store.submit([spec(name="a" if i % 2 else "b") for i in range(7)], NOW)
    finish(store, [ids[0]], NOW, TaskState.FAILED)

    first = store.list_tasks(TaskQuery(), 3)
    assert [t.id for t in first.tasks] == ids[::-1][:3]
    assert first.next_cursor is not None
    second = store.list_tasks(TaskQuery(), 3, first.next_cursor)
    third = store.list_tasks(TaskQuery(), 3, second.next_cursor)
    assert [t.id for t in second.tasks + third.tasks] == ids[::-1][3:]
    assert third.next_cursor is None

    by_name = store.list_tasks(TaskQuery(name="a"), 10)
    assert [t.id for t in by_name.tasks] == [ids[5], ids[3], ids[1]]
    failed = store.list_tasks(TaskQuery(queue="q", states=frozenset({TaskState.FAILED})), 10)
    assert [(t.id, t.state) for t in failed.tasks] == [(ids[0], TaskState.FAILED)]
    assert store.list_tasks(TaskQuery(queue="nope"), 10) == type(first)([], None)


def test_list_tasks_sees_each_task_once_while_new_ones_arrive(open_with: OpenStore) -> None:
    store = open_with()
    before = store.submit([spec() for _ in range(250)], NOW)

    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_tasks(TaskQuery(), 40, cursor)
        seen += [t.id for t in page.tasks]
        store.submit([spec() for _ in range(7)], NOW)  # newer: after the first page's start
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == before[::-1]


# sqlite schema


def test_a_version_1_sqlite_file_is_migrated_and_keeps_its_tasks(tmp_path: Path) -> None:
    # Given a file written by the first schema, with a task in it
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[1]:
        db.execute(statement)
    db.execute(
        """INSERT INTO tasks (id, name, queue, payload, content_type, priority, max_attempts,
        timeout_s, not_before, idempotency_key, metadata, state, ready, ready_at, created_at)
        VALUES ('t1', 'add', 'q', x'7b7d', 'application/json', 0, 0, 0, 0, 'k', '{}', 3, 0,
        0, ?)""",
        (NOW,),
    )
    db.execute("PRAGMA user_version = 1")
    db.close()

    # When the current store opens it
    store = SqliteStore(str(path), StorePolicy(result_ttl_s=TTL_S))
    try:
        # Then the task is there, the new columns have their defaults, and it is usable
        task = store.get("t1")
        assert (task.state, task.lost_leases, task.expires_at) == (TaskState.SUCCEEDED, 0, 0)
        assert store.submit([spec(idempotency_key="k")], NOW) == ["t1"]
        assert store.purge(TaskQuery(), 10) == 1
        assert store.stats() == []  # its one queue left with its last task
    finally:
        store.close()
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == max(MIGRATIONS)


def test_a_version_8_sqlite_file_keeps_its_counts_without_the_count_triggers(
    tmp_path: Path,
) -> None:
    # Given a file of schema 8, whose triggers counted its tasks
    path = tmp_path / "v8.db"
    db = sqlite3.connect(path, isolation_level=None)
    for number in range(1, 9):
        for statement in MIGRATIONS[number]:
            db.execute(statement)
    for task_id, queue in [("t1", "q"), ("t2", "q"), ("t3", "b")]:
        db.execute(INSERT, task_row(task_id, spec(queue=queue), NOW))
    db.execute("UPDATE tasks SET state = ?, lease = 1 WHERE id = 't2'", (TaskState.RUNNING,))
    db.execute("UPDATE tasks SET state = ? WHERE id = 't3'", (TaskState.SUCCEEDED,))
    db.execute("PRAGMA user_version = 8")
    db.close()

    # When the current store opens it
    store = SqliteStore(str(path), StorePolicy())
    try:
        # Then the counts are as they were, the store keeps them, and the triggers are gone
        def counts() -> dict[str, dict[TaskState, int]]:
            return {c.queue: {s: n for s, n in c.counts.items() if n} for c in store.stats()}

        assert counts() == {
            "b": {TaskState.SUCCEEDED: 1},
            "q": {TaskState.PENDING: 1, TaskState.RUNNING: 1},
        }
        store.lease("w", ["q"], None, 10, LEASE_S, NOW)
        assert store.purge(TaskQuery(queue="b"), 10) == 1
        assert counts() == {"q": {TaskState.RUNNING: 2}}
    finally:
        store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    assert db.execute("PRAGMA user_version").fetchone()[0] == max(MIGRATIONS)


def test_a_stale_lease_ref_cannot_touch_a_pruned_task(open_with: OpenStore) -> None:
    store = open_with(result_ttl_s=TTL_S)
    (task_id,) = store.submit([spec()], NOW)
    (leased,) = store.lease("w", ["q"], None, 1, LEASE_S, NOW)
    store.cancel(task_id, NOW)
    store.prune(NOW + TTL_S, 10)

    ref = LeaseRef(task_id, leased.task.lease)
    assert store.extend("w", [ref], LEASE_S, NOW + TTL_S) == [ref]
    assert store.record([Outcome(ref, TaskState.SUCCEEDED, result=b"1")], NOW + TTL_S) == []
    assert store.release([ref], NOW + TTL_S) == 0
