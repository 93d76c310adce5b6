"""The memory store keeps finished tasks out of the garbage collector's sight:
a million results kept until their TTL must not make every full collection walk
millions of objects. (What it answers is the contract suite's business.)"""

from __future__ import annotations

import dataclasses
import gc
import json

from taskfleet.common.model import Outcome, Progress, TaskError, TaskSpec, TaskState
from taskfleet.master.store import MemoryStore, TaskQuery

NOW = 1_000_000.0
BOOM = TaskError("ValueError", "boom", "Traceback (most recent call last): ...")


def finish_families(store: MemoryStore, n: int, tag: str) -> None:
    """Submit ``n`` parents, each with a child that takes its result, and end
    them all: half the parents succeed (their children then succeed), half fail
    (their children are cancelled)."""
    specs = []
    for i in range(n):
        specs.append(TaskSpec("parent", "q", metadata={"i": str(i)}, idempotency_key=f"{tag}{i}"))
        specs.append(TaskSpec("child", "q", depends_on=(f"${2 * i}",), pass_results=True))
    store.submit(specs, NOW)
    for name, ready in (("parent", n), ("child", n // 2)):
        leases = store.lease("w1", ["q"], [name], 2 * n, 30.0, NOW)
        assert len(leases) == ready
        store.record(
            [
                Outcome(one.ref, TaskState.SUCCEEDED, result=b"[1]")
                if i % 2 == 0 or name == "child"
                else Outcome(one.ref, TaskState.FAILED, error=BOOM, max_attempts=1)
                for i, one in enumerate(leases)
            ],
            NOW,
        )
    assert not store.lease("w1", ["q"], None, 1, 30.0, NOW)
    assert (
        sum(c.counts[TaskState.PENDING] + c.counts[TaskState.RUNNING] for c in store.stats()) == 0
    )


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_finished_tasks_are_not_tracked_by_the_garbage_collector() -> None:
    # Given a store that holds 2,000 finished tasks of every final state
    store = MemoryStore()
    finish_families(store, 1000, "first")
    before = tracked_objects()
    # When 4,000 more finish (with metadata, parents and errors among them)
    finish_families(store, 2000, "more")
    # Then the collector tracks not one object more per task (they were three before)
    grown = tracked_objects() - before
    assert grown < 400, f"{grown} more objects tracked after 4,000 more tasks finished"


def test_a_finished_task_reads_back_whole_and_comes_back_to_life_on_retry() -> None:
    # Given a task with every field set, that failed after reporting progress
    store = MemoryStore()
    [parent] = store.submit([TaskSpec("parent", "q")], NOW)
    [lease] = store.lease("w1", ["q"], None, 1, 30.0, NOW)
    store.record([Outcome(lease.ref, TaskState.SUCCEEDED, result=b"7")], NOW)
    spec = TaskSpec(
        "add",
        "q",
        b'{"args": [1, 2], "kwargs": {}}',
        "application/json",
        priority=3,
        max_attempts=1,
        timeout_s=5.0,
        not_before=NOW - 1,
        idempotency_key="once",
        metadata={"a": "1", "b": "2"},
        result_ttl_s=60.0,
        expires_at=NOW + 100,
        depends_on=(parent,),
        gather_results=True,
        concurrency_key="db",
        concurrency_limit=2,
    )
    [task_id] = store.submit([spec], NOW + 1)
    [lease] = store.lease("w2", ["q"], None, 1, 30.0, NOW + 2)
    store.set_progress([Progress(lease.ref, 0.5, "half")])
    [ended] = store.record([Outcome(lease.ref, TaskState.FAILED, error=BOOM)], NOW + 3)
    # When it is read back, from its frozen form
    read = store.get(task_id)
    # Then every field is as the final record returned it, and the reader owns its copy
    assert read == ended
    assert json.loads(read.spec.payload)["args"] == [[7], 1, 2]
    assert read.spec == dataclasses.replace(spec, payload=read.spec.payload)
    assert (read.error, read.progress, read.progress_message) == (BOOM, 0.5, "half")
    read.spec.metadata["a"] = "changed"
    assert store.get(task_id).spec.metadata == {"a": "1", "b": "2"}
    # When it is retried, it runs again with the same spec
    assert store.retry(task_id, NOW + 4).state is TaskState.PENDING
    [again] = store.lease("w1", ["q"], None, 1, 30.0, NOW + 4)
    assert again.task.id == task_id
    assert again.task.spec == ended.spec
    assert (again.task.attempts, again.task.lease) == (2, 2)


def test_prune_deletes_only_what_is_due_within_a_second_and_up_to_the_limit() -> None:
    # Given five tasks that end within one second (TTL 10 s), one of them retried
    # and ended again a second later
    store = MemoryStore()
    ids = store.submit([TaskSpec("add", "q", result_ttl_s=10.0) for _ in range(5)], NOW)
    leases = store.lease("w1", ["q"], None, 5, 30.0, NOW)
    for i, one in enumerate(leases[:4]):
        store.record([Outcome(one.ref, TaskState.SUCCEEDED)], NOW + 0.2 * i)
    store.record([Outcome(leases[4].ref, TaskState.FAILED, error=BOOM)], NOW + 0.1)
    store.retry(ids[4], NOW + 0.5)
    [again] = store.lease("w1", ["q"], None, 1, 30.0, NOW + 0.5)
    store.record([Outcome(again.ref, TaskState.FAILED, error=BOOM)], NOW + 1.5)
    # When pruning mid-second, with a limit of one, then more
    assert store.prune(NOW + 10.3, 1) == 1
    assert store.prune(NOW + 10.3, 10) == 1
    # Then only the tasks that expired by then are gone
    assert kept(store) == set(ids[2:])
    # And the rest go once due, the retried one at its second expiry
    assert store.prune(NOW + 10.5, 10) == 1
    assert store.prune(NOW + 11.4, 10) == 1
    assert kept(store) == {ids[4]}
    assert store.prune(NOW + 11.5, 10) == 1
    assert kept(store) == set()


def kept(store: MemoryStore) -> set[str]:
    return {task.id for task in store.list_tasks(TaskQuery(), 100).tasks}
