"""Model-based test of the Store contract: random sequences of operations run
against every store and are checked, step by step, against a plain model of
what each task's state must be.

The machine owns the clock (``now``), so leases lapse and delays pass without
sleeping; the SQLite and PostgreSQL machines also close and reopen their store between
steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from taskfleet.common.errors import FailedPrecondition, NotFound
from taskfleet.common.model import LeaseRef, Outcome, Task, TaskError, TaskSpec, TaskState
from taskfleet.master.store import MemoryStore, Store, StorePolicy, TaskQuery, open_store
from taskfleet.master.store.base import worker_lost_error

from pg import store_url

START = 1_000_000.0
QUEUES = ("q1", "q2", "q3")
NAMES = ("add", "mul", "sub")
WORKERS = ("w1", "w2")
KEYS = ("k1", "k2", "k3")
UNKNOWN_ID = "no-such-task"
BOOM = TaskError("ValueError", "boom", "Traceback (most recent call last): ...")
# Examples for PostgreSQL, where each creates a database and a step is a few round trips.
PG_EXAMPLES = 40

# Delays relative to the machine's clock: None means no not_before at all.
NOT_BEFORE_DELAYS = st.sampled_from([None, None, -5.0, 0.0, 0.5, 10.0, 60.0])
LEASE_S = st.sampled_from([30.0, 5.0, 1.0])
# Mostly every queue and any name, so most leases find work; some narrow or repeat.
LEASE_QUEUES = st.sampled_from([QUEUES, QUEUES, QUEUES, ("q1",), ("q3", "q2"), ("q2", "q2"), ()])
LEASE_NAMES = st.sampled_from([None, None, None, ("add",), ("sub", "mul"), ("add", "add"), ()])
CLOCK_STEPS = st.sampled_from([1.0, 0.5, 0.0, 2.0, 5.0, 31.0]) | st.floats(0.0, 10.0)
# Small limits, so that runs reach lost-lease failures and pruning often.
# Retry delays exact (0, 5, 10, ... s by attempts used), so the model can predict them.
POLICY = StorePolicy(
    result_ttl_s=40.0, max_lost_leases=1, retry_backoff_s=lambda used: 5.0 * (used - 1)
)


@dataclasses.dataclass(frozen=True)
class SpecDraw:
    """A spec whose not_before is fixed only when submitted, relative to the clock."""

    name: str
    queue: str
    priority: int
    delay_s: float | None
    key: str
    payload: bytes

    def spec(self, now: float) -> TaskSpec:
        return TaskSpec(
            name=self.name,
            queue=self.queue,
            payload=self.payload,
            priority=self.priority,
            not_before=0.0 if self.delay_s is None else now + self.delay_s,
            idempotency_key=self.key,
            metadata={"draw": self.name},
        )


SPECS = st.builds(
    SpecDraw,
    name=st.sampled_from(NAMES),
    queue=st.sampled_from(QUEUES),
    priority=st.integers(-2, 2),
    delay_s=NOT_BEFORE_DELAYS,
    key=st.sampled_from(["", "", *KEYS]),
    payload=st.binary(max_size=8),
)


@dataclasses.dataclass(frozen=True)
class OutcomeDraw:
    """How an attempt ends, before a lease ref is attached."""

    state: TaskState
    max_attempts: int = 1
    result: bytes = b""
    error: TaskError | None = None

    def outcome(self, ref: LeaseRef) -> Outcome:
        return Outcome(
            ref,
            self.state,
            result=self.result,
            error=self.error,
            max_attempts=self.max_attempts,
        )


OUTCOMES = st.one_of(
    st.builds(OutcomeDraw, st.just(TaskState.SUCCEEDED), result=st.binary(max_size=8)),
    st.builds(
        OutcomeDraw,
        st.just(TaskState.FAILED),
        max_attempts=st.integers(1, 4),
        error=st.sampled_from([BOOM, None]),
    ),
    st.builds(OutcomeDraw, st.just(TaskState.FAILED), error=st.sampled_from([BOOM, None])),
    st.just(OutcomeDraw(TaskState.CANCELLED)),
)


@dataclasses.dataclass
class Expected:
    """What the store must say about one task, plus the scheduling facts Task omits."""

    task: Task
    index: int  # submission order: FIFO among equal priorities
    ready_at: float = 0.0  # PENDING: not leased before this
    deadline: float = 0.0  # RUNNING: the lease lapses at this time
    lost_by: list[str] = dataclasses.field(default_factory=list)  # workers of lapsed leases
    attempt_base: int = 0  # attempts at the last retry

    def valid(self, ref: LeaseRef) -> bool:
        return self.task.state is TaskState.RUNNING and self.task.lease == ref.lease


class StoreMachine(RuleBasedStateMachine):
    """Drives one store and a model side by side; subclasses choose the store."""

    durable = False

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="taskfleet-model-"))
        self.store = self.open_store()
        self.expected: dict[str, Expected] = {}
        self.keys: dict[str, str] = {}
        self.refs: list[tuple[LeaseRef, str]] = []  # every lease ever handed out, by worker
        self.finals: dict[str, Task] = {}  # each task as first seen final
        self.last_seen: dict[str, tuple[int, int]] = {}  # attempts, lease
        self.released: set[str] = set()  # released in the latest step
        self.submitted = itertools.count()  # submission order, unlike len(expected) after prunes

    def open_store(self) -> Store:
        raise NotImplementedError

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # helpers

    def ids(self) -> list[str]:
        return list(self.expected)

    def snapshot(self) -> list[Task]:
        return self.store.get_many(self.ids())

    def held(self) -> list[tuple[LeaseRef, str]]:
        """The leases the model says are current, each with the worker it went to."""
        return [(ref, w) for ref, w in self.refs if self.expected[ref.task_id].valid(ref)]

    def draw_held(self, data: Any) -> tuple[LeaseRef, str]:
        return data.draw(st.sampled_from(self.held()))  # type: ignore[no-any-return]

    def draw_refs(self, data: Any, count: int) -> list[LeaseRef]:
        """``count`` refs of leases ever handed out, held or stale by now."""
        refs = st.sampled_from([ref for ref, _ in self.refs])
        return [data.draw(refs) for _ in range(count)]

    def finish(self, entry: Expected, state: TaskState) -> None:
        task = entry.task
        task.state = state
        task.finished_at = self.now
        task.expires_at = self.now + POLICY.result_ttl_s

    def apply_outcome(self, outcome: Outcome) -> Task | None:
        """Apply ``outcome`` to the model; the task if it became final, else None."""
        entry = self.expected.get(outcome.ref.task_id)
        if entry is None or not entry.valid(outcome.ref):
            return None
        task = entry.task
        if outcome.state is TaskState.SUCCEEDED:
            task.result = outcome.result
            task.result_content_type = outcome.result_content_type
            task.error = None
            self.finish(entry, TaskState.SUCCEEDED)
        elif outcome.state is TaskState.CANCELLED:
            self.finish(entry, TaskState.CANCELLED)
        else:
            task.error = outcome.error
            used = task.attempts - entry.attempt_base - task.lost_leases
            if used >= outcome.max_attempts:
                self.finish(entry, TaskState.FAILED)
            else:
                task.state = TaskState.PENDING
                entry.ready_at = self.now + POLICY.retry_backoff_s(used)
        return dataclasses.replace(task)

    # rules

    @rule(draws=st.lists(SPECS, min_size=1, max_size=4))
    def submit(self, draws: list[SpecDraw]) -> None:
        specs = [draw.spec(self.now) for draw in draws]

        ids = self.store.submit(specs, self.now)

        assert len(ids) == len(specs)
        for spec, task_id in zip(specs, ids, strict=True):
            known = self.keys.get(spec.idempotency_key) if spec.idempotency_key else None
            if known is not None:
                assert task_id == known, f"key {spec.idempotency_key} gave a second task"
                continue
            assert task_id not in self.expected, f"id {task_id} handed out twice"
            if spec.idempotency_key:
                self.keys[spec.idempotency_key] = task_id
            self.expected[task_id] = Expected(
                Task(task_id, spec, created_at=self.now),
                index=next(self.submitted),
                ready_at=max(spec.not_before, self.now),
            )

    @rule(
        worker=st.sampled_from(WORKERS),
        queues=LEASE_QUEUES,
        names=LEASE_NAMES,
        limit=st.sampled_from([3, 1, 5, 2, 4, 0]),
        lease_s=LEASE_S,
    )
    def lease(
        self,
        worker: str,
        queues: tuple[str, ...],
        names: tuple[str, ...] | None,
        limit: int,
        lease_s: float,
    ) -> None:
        ready = sorted(
            (
                entry
                for entry in self.expected.values()
                if entry.task.state is TaskState.PENDING
                and entry.ready_at <= self.now
                and entry.task.spec.queue in queues
                and (names is None or entry.task.spec.name in names)
            ),
            key=lambda entry: (-entry.task.spec.priority, entry.index),
        )[:limit]

        leases = self.store.lease(worker, queues, names, limit, lease_s, self.now)

        assert [one.task.id for one in leases] == [entry.task.id for entry in ready]
        for one, entry in zip(leases, ready, strict=True):
            task = entry.task
            task.state = TaskState.RUNNING
            task.attempts += 1
            task.lease += 1
            task.worker_id = worker
            task.started_at = self.now
            entry.deadline = self.now + lease_s
            assert one.task == task
            assert one.deadline == entry.deadline
            assert one.ref == LeaseRef(task.id, task.lease)
            self.refs.append((one.ref, worker))

    @precondition(lambda self: self.held())
    @rule(data=st.data(), lease_s=LEASE_S)
    def heartbeat(self, data: Any, lease_s: float) -> None:
        ref, holder = self.draw_held(data)
        worker = data.draw(st.sampled_from([holder, holder, *WORKERS]))
        refs = [ref, *self.draw_refs(data, data.draw(st.integers(0, 2)))]
        if data.draw(st.booleans()):
            refs.append(LeaseRef(ref.task_id, ref.lease - 1))  # an older lease number
        expected_stale = []
        for one in refs:
            entry = self.expected[one.task_id]
            if entry.valid(one) and entry.task.worker_id == worker:
                entry.deadline = self.now + lease_s
            else:
                expected_stale.append(one)

        stale = self.store.extend(worker, refs, lease_s, self.now)

        assert stale == expected_stale

    @precondition(lambda self: self.held())
    @rule(data=st.data(), outcomes=st.lists(OUTCOMES, min_size=1, max_size=3))
    def record(self, data: Any, outcomes: list[OutcomeDraw]) -> None:
        # The first outcome is for a held lease; the others for any lease, maybe stale.
        refs = [self.draw_held(data)[0], *self.draw_refs(data, len(outcomes) - 1)]
        batch = [draw.outcome(ref) for draw, ref in zip(outcomes, refs, strict=True)]
        expected_changed = [task for o in batch if (task := self.apply_outcome(o)) is not None]

        changed = self.store.record(batch, self.now)

        assert changed == expected_changed

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), outcome=OUTCOMES)
    def stale_outcome_changes_nothing(self, data: Any, outcome: OutcomeDraw) -> None:
        task_id = data.draw(st.sampled_from(self.ids()))
        task = self.expected[task_id].task
        old_refs = [ref for ref, _ in self.refs if not self.expected[ref.task_id].valid(ref)]
        candidates = [
            LeaseRef(task_id, task.lease - 1),
            LeaseRef(task_id, task.lease + 1),
            LeaseRef(UNKNOWN_ID, 1),
            *old_refs,
        ]
        if task.state is not TaskState.RUNNING:
            candidates.append(LeaseRef(task_id, task.lease))
        ref = data.draw(st.sampled_from(candidates))
        assert not (ref.task_id in self.expected and self.expected[ref.task_id].valid(ref))
        before = self.snapshot()

        finished = self.store.record([outcome.outcome(ref)], self.now)
        released = self.store.release([ref], self.now)
        stale = self.store.extend(self.expected[task_id].task.worker_id, [ref], 5.0, self.now)

        assert (finished, released, stale) == ([], 0, [ref])
        assert self.snapshot() == before

    @precondition(lambda self: self.held())
    @rule(data=st.data())
    def release(self, data: Any) -> None:
        refs = [self.draw_held(data)[0], *self.draw_refs(data, data.draw(st.integers(0, 2)))]
        expected_count = 0
        for ref in refs:
            entry = self.expected[ref.task_id]
            if entry.valid(ref):
                entry.task.state = TaskState.PENDING
                entry.task.attempts -= 1
                entry.ready_at = self.now
                expected_count += 1
                self.released.add(ref.task_id)

        released = self.store.release(refs, self.now)

        assert released == expected_count

    # Final and unknown tasks as often as live ones, so cancel does not end every task.
    @rule(data=st.data(), which=st.sampled_from(["final", "live", "unknown"]))
    def cancel(self, data: Any, which: str) -> None:
        finals = [i for i, entry in self.expected.items() if entry.task.state.is_final]
        live = [i for i in self.expected if i not in finals]
        candidates = {"final": finals, "live": live}.get(which) or [UNKNOWN_ID]
        task_id = data.draw(st.sampled_from(candidates))
        entry = self.expected.get(task_id)
        if entry is None:
            with pytest.raises(NotFound, match=task_id):
                self.store.cancel(task_id, self.now)
            return
        if entry.task.state.is_final:
            with pytest.raises(FailedPrecondition, match=task_id):
                self.store.cancel(task_id, self.now)
            return
        self.finish(entry, TaskState.CANCELLED)

        (cancelled,) = self.store.cancel(task_id, self.now)

        assert cancelled == entry.task

    @rule(step_s=CLOCK_STEPS, past_a_deadline=st.booleans(), reap=st.booleans())
    def advance_clock(self, step_s: float, past_a_deadline: bool, reap: bool) -> None:
        deadlines = [
            entry.deadline
            for entry in self.expected.values()
            if entry.task.state is TaskState.RUNNING and entry.deadline > self.now
        ]
        if past_a_deadline and deadlines:
            # A worker goes quiet: its lease lapses, whatever the heartbeats did before.
            self.now = min(deadlines)
        self.now += step_s
        delayed = [
            entry.ready_at
            for entry in self.expected.values()
            if entry.task.state is TaskState.PENDING and entry.ready_at > self.now
        ]

        ready_at = self.store.next_ready_at(self.now)

        assert ready_at == (min(delayed) if delayed else None)
        if reap:  # as the master's reaper does after time passed
            self.expire()

    @rule()
    def expire(self) -> None:
        lapsed = sorted(
            (
                entry
                for entry in self.expected.values()
                if entry.task.state is TaskState.RUNNING and entry.deadline <= self.now
            ),
            key=lambda entry: (entry.deadline, entry.index),
        )
        for entry in lapsed:
            task = entry.task
            entry.lost_by.append(task.worker_id)
            task.lost_leases += 1
            if task.lost_leases > POLICY.max_lost_leases:
                task.error = worker_lost_error(entry.lost_by)
                self.finish(entry, TaskState.FAILED)
            else:
                task.state = TaskState.PENDING
                entry.ready_at = self.now

        expired = self.store.expire(self.now)

        assert expired == [entry.task for entry in lapsed]

    # Failed and cancelled tasks as often as others, so retries do happen.
    @precondition(lambda self: self.expected)
    @rule(data=st.data(), which=st.sampled_from(["ended badly", "other"]))
    def retry(self, data: Any, which: str) -> None:
        bad = [
            i
            for i, entry in self.expected.items()
            if entry.task.state in (TaskState.FAILED, TaskState.CANCELLED)
        ]
        others = [i for i in self.expected if i not in bad]
        task_id = data.draw(
            st.sampled_from({"ended badly": bad, "other": others}[which] or bad or others)
        )
        entry = self.expected[task_id]
        task = entry.task
        if task_id not in bad:
            with pytest.raises(FailedPrecondition, match=task_id):
                self.store.retry(task_id, self.now)
            return
        task.state = TaskState.PENDING
        entry.ready_at = self.now
        entry.attempt_base = task.attempts
        entry.lost_by.clear()
        task.lost_leases = 0
        task.finished_at = task.expires_at = 0.0
        self.finals.pop(task_id, None)  # a retried task may end again, differently

        retried = self.store.retry(task_id, self.now)

        assert retried == task

    @rule(
        queue=st.sampled_from(["", *QUEUES]),
        name=st.sampled_from(["", *NAMES]),
        states=st.frozensets(st.sampled_from(list(TaskState)), max_size=2),
        page_size=st.sampled_from([1, 2, 3, 50]),
    )
    def list_tasks(
        self, queue: str, name: str, states: frozenset[TaskState], page_size: int
    ) -> None:
        query = TaskQuery(queue, name, states)
        expected = [
            entry.task
            for entry in sorted(self.expected.values(), key=lambda e: -e.index)
            if (not queue or entry.task.spec.queue == queue)
            and (not name or entry.task.spec.name == name)
            and (not states or entry.task.state in states)
        ]

        listed: list[Task] = []
        cursor = None
        while True:
            page = self.store.list_tasks(query, page_size, cursor)
            assert len(page.tasks) <= page_size
            listed += page.tasks
            if page.next_cursor is None:
                break
            cursor = page.next_cursor

        assert listed == expected

    @rule(
        queue=st.sampled_from(["", *QUEUES]),
        states=st.frozensets(
            st.sampled_from([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
        ),
        limit=st.sampled_from([1, 100]),
    )
    def purge(self, queue: str, states: frozenset[TaskState], limit: int) -> None:
        wanted = states or frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
        matching = [
            task_id
            for task_id, entry in self.expected.items()
            if (not queue or entry.task.spec.queue == queue) and entry.task.state in wanted
        ]

        purged = self.store.purge(TaskQuery(queue=queue, states=states), limit)

        # Which ones a limited purge takes is the store's choice; how many, and
        # that it takes nothing else, is not.
        present = {t.id for t in self.store.list_tasks(TaskQuery(), 10_000).tasks}
        gone = set(self.expected) - present
        assert purged == min(limit, len(matching)) == len(gone)
        assert gone <= set(matching)
        self.forget(gone)

    def forget(self, gone: set[str]) -> None:
        """Drop deleted tasks from the model."""
        for task_id in gone:
            del self.expected[task_id]
            self.finals.pop(task_id, None)
            self.last_seen.pop(task_id, None)
        self.keys = {key: i for key, i in self.keys.items() if i not in gone}
        self.refs = [(ref, w) for ref, w in self.refs if ref.task_id not in gone]

    @rule(limit=st.sampled_from([1, 2, 100]))
    def prune(self, limit: int) -> None:
        due = sorted(
            (entry for entry in self.expected.values() if 0 < entry.task.expires_at <= self.now),
            key=lambda entry: (entry.task.expires_at, entry.index),
        )[:limit]
        gone = {entry.task.id for entry in due}
        self.forget(gone)

        pruned = self.store.prune(self.now, limit)

        assert pruned == len(gone)
        for task_id in gone:
            with pytest.raises(NotFound):
                self.store.get(task_id)

    @precondition(lambda self: self.durable)
    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self.open_store()

    # invariants

    @invariant()
    def every_task_is_as_the_model_says(self) -> None:
        tasks = self.snapshot()

        assert [t.id for t in tasks] == self.ids()
        for task in tasks:
            assert task == self.expected[task.id].task, f"task {task.id} differs from the model"
        assert self.store.get_final(self.ids()) == [t for t in tasks if t.state.is_final]
        total = sum(sum(counts.counts.values()) for counts in self.store.stats())
        assert total == len(self.expected), "the store holds tasks nobody submitted"

    @invariant()
    def final_states_never_change(self) -> None:
        for task in self.snapshot():
            if task.id in self.finals:
                assert task == self.finals[task.id], f"final task {task.id} changed"
            elif task.state.is_final:
                self.finals[task.id] = task

    @invariant()
    def attempts_and_lease_numbers_never_go_back(self) -> None:
        for task in self.snapshot():
            attempts, lease = self.last_seen.get(task.id, (0, 0))
            assert task.lease >= lease, f"lease number of {task.id} went back"
            if task.id in self.released:
                assert task.attempts in (attempts, attempts - 1)
            else:
                assert task.attempts >= attempts, f"attempts of {task.id} went back"
            self.last_seen[task.id] = (task.attempts, task.lease)
        self.released.clear()

    @invariant()
    def stats_match_the_tasks(self) -> None:
        by_queue: dict[str, Counter[TaskState]] = {}
        for task in self.snapshot():
            by_queue.setdefault(task.spec.queue, Counter())[task.state] += 1

        stats = self.store.stats()

        assert [counts.queue for counts in stats] == sorted(by_queue)
        for counts in stats:
            assert set(counts.counts) == set(TaskState)
            assert counts.counts == {s: by_queue[counts.queue][s] for s in TaskState}


def store_machine(kind: str) -> type[StoreMachine]:
    """A state machine class that runs against a fresh store of ``kind`` per example."""

    class Machine(StoreMachine):
        durable = kind != "memory"

        def open_store(self) -> Store:
            if not hasattr(self, "url"):  # the first open of this example: a new store
                self.closing = ExitStack()
                self.url = self.closing.enter_context(store_url(kind, self.tmp_dir))
            if kind == "memory":
                return MemoryStore(POLICY)
            return open_store(self.url, POLICY)

        def teardown(self) -> None:
            super().teardown()
            self.closing.close()

    Machine.__name__ = Machine.__qualname__ = f"{kind.capitalize()}StoreMachine"
    return Machine


MODEL_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)
POSTGRES_SETTINGS = settings(max_examples=PG_EXAMPLES, stateful_step_count=50, deadline=None)

MemoryStoreMachine = store_machine("memory")
SqliteStoreMachine = store_machine("sqlite")
PostgresStoreMachine = store_machine("postgres")

TestMemoryStoreModel = MemoryStoreMachine.TestCase
TestMemoryStoreModel.settings = MODEL_SETTINGS
TestSqliteStoreModel = SqliteStoreMachine.TestCase
TestSqliteStoreModel.settings = MODEL_SETTINGS
TestPostgresStoreModel = PostgresStoreMachine.TestCase
TestPostgresStoreModel.settings = POSTGRES_SETTINGS
