"""The master's lifecycle front door, without the network: every state change
reaches the listeners once, with what it changed."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pytest

from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import Outcome, Task, TaskError, TaskSpec, TaskState
from taskfleet.master.lifecycle import DELETE_BATCH, Lifecycle, LifecycleListener
from taskfleet.master.store import MemoryStore, StorePolicy, TaskQuery

from procs import poll

BOOM = TaskError("ValueError", "boom")


class Recorder(LifecycleListener):
    """Writes down every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def submitted(self, tasks: Sequence[TaskSpec]) -> None:
        self.calls.append(("submitted", [s.name for s in tasks]))

    def finished(self, tasks: Sequence[Task]) -> None:
        self.calls.append(("finished", [(t.id, t.state) for t in tasks]))

    def retried(self, tasks: Sequence[Task]) -> None:
        self.calls.append(("retried", [t.id for t in tasks]))

    def lost(self, tasks: Sequence[Task]) -> None:
        self.calls.append(("lost", [t.id for t in tasks]))

    def cancelled(self, task: Task) -> None:
        self.calls.append(("cancelled", task.id))

    def pruned(self, count: int) -> None:
        self.calls.append(("pruned", count))

    def work_available(
        self, queues: Collection[str] | None, names: Collection[str] | None, tasks: int | None
    ) -> None:
        self.calls.append(("work_available", (queues, names, tasks)))

    def take(self) -> list[tuple[str, object]]:
        calls, self.calls = self.calls, []
        return calls


class Broken(LifecycleListener):
    def finished(self, tasks: Sequence[Task]) -> None:
        raise RuntimeError("a listener that fails")


def make(**policy: float) -> tuple[Lifecycle, Recorder]:
    recorder = Recorder()
    store = MemoryStore(StorePolicy(retry_backoff_s=lambda used: 0.0, **policy))  # type: ignore[arg-type]
    return Lifecycle(store, max_payload_bytes=1024, listeners=[Broken(), recorder]), recorder


def test_submit_reports_the_specs_and_wakes_workers() -> None:
    lifecycle, recorder = make()

    lifecycle.submit([TaskSpec("a"), TaskSpec("b")])

    assert recorder.take() == [
        ("submitted", ["a", "b"]),
        ("work_available", ({"default"}, {"a", "b"}, 2)),
    ]


def test_bad_specs_change_nothing_and_report_nothing() -> None:
    lifecycle, recorder = make()

    with pytest.raises(InvalidArgument, match="name"):
        lifecycle.submit([TaskSpec("ok"), TaskSpec("")])

    assert recorder.take() == []
    assert lifecycle.store.stats() == []


def test_outcomes_report_finals_and_retries_apart() -> None:
    lifecycle, recorder = make()
    done, again = lifecycle.submit([TaskSpec("a"), TaskSpec("b")])
    leases = {one.task.id: one for one in lifecycle.lease("w", ["default"], None, 2, 30)}
    recorder.take()

    lifecycle.record(
        [
            Outcome(leases[done].ref, TaskState.SUCCEEDED, result=b"1"),
            Outcome(leases[again].ref, TaskState.FAILED, error=BOOM, max_attempts=2),
        ]
    )
    # a late duplicate of a final outcome reports nothing
    lifecycle.record([Outcome(leases[done].ref, TaskState.SUCCEEDED, result=b"2")])

    assert recorder.take() == [
        ("finished", [(done, TaskState.SUCCEEDED)]),
        ("retried", [again]),
        ("work_available", ({"default"}, {"b"}, 1)),
    ]


def test_cancel_reports_the_task_to_stop_and_its_end() -> None:
    lifecycle, recorder = make()
    (task_id,) = lifecycle.submit([TaskSpec("a")])
    lifecycle.lease("w", ["default"], None, 1, 30)
    recorder.take()

    lifecycle.cancel(task_id)

    assert recorder.take() == [
        ("cancelled", task_id),
        ("finished", [(task_id, TaskState.CANCELLED)]),
    ]


def test_lapsed_leases_are_reported_lost_and_the_last_one_ends_the_task() -> None:
    lifecycle, recorder = make(max_lost_leases=1)
    (task_id,) = lifecycle.submit([TaskSpec("a")])
    recorder.take()

    for _ in range(2):
        lifecycle.lease("w", ["default"], None, 1, 0.001)
        poll(lifecycle.expire, what="the 1 ms lease to lapse")

    assert recorder.take() == [
        ("lost", [task_id]),
        ("work_available", ({"default"}, {"a"}, 1)),
        ("lost", [task_id]),
        ("finished", [(task_id, TaskState.FAILED)]),
    ]


def test_retry_and_purge_and_prune_report_what_they_did() -> None:
    lifecycle, recorder = make(result_ttl_s=0.001)
    ids = lifecycle.submit([TaskSpec("a") for _ in range(DELETE_BATCH + 3)])
    for task_id in ids:
        lifecycle.cancel(task_id)
    recorder.take()

    lifecycle.retry(ids[0])
    with pytest.raises(InvalidArgument, match="states"):
        lifecycle.purge(TaskQuery(states=frozenset({TaskState.PENDING})))
    purged = lifecycle.purge(TaskQuery(states=frozenset({TaskState.CANCELLED})))
    lifecycle.cancel(ids[0])
    recorder.take()
    pruned = poll(lifecycle.prune, what="the 1 ms result TTL to run out")

    assert (purged, pruned) == (DELETE_BATCH + 2, 1)
    assert recorder.take() == [("pruned", 1)]
    assert lifecycle.store.stats() == []
