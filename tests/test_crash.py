"""A master killed with SIGKILL in the middle of a busy run on its SQLite file,
then restarted on the same port and file.

About 3,000 tasks are in every state when the master dies: done, running (some
slow, two held open by gates), pending, delayed by ``not_before``, waiting to
retry after injected failures, cancelled, and a producer is still submitting.
Afterwards every id a client got back exists, every task ends in the state its
kind was built for, no final state is ever rewritten, the workers come back by
themselves, and GetStats agrees with the tasks.

A watcher thread records the first final state the master reports for each
task, through the crash and the restart, so the final check can tell a task
that was finished twice from one finished once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.errors import TaskfleetError
from taskfleet.common.model import Task, TaskSpec, TaskState
from taskfleet.master.store import SqliteStore

from procs import MasterProc, WorkerProc, poll

SEED = 20240903
WAIT_S = 30.0
FINAL_WAIT_S = 120.0  # every task final after the restart; far more than needed

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


# -- what each task is built to end as ------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """How a task must end: its state, and its result (SUCCEEDED) or error type (FAILED)."""

    state: TaskState
    value: Any = None


def mixed_specs(queue: str, rng: random.Random) -> list[tuple[TaskSpec, Expect]]:
    """About 2,200 tasks of every kind, shuffled so that each kind is everywhere in the run."""
    now = time.time()
    specs: list[tuple[TaskSpec, Expect]] = []

    def add(spec: TaskSpec, expect: Expect) -> None:
        specs.append((spec, expect))

    for n in range(1_200):
        add(make_spec("square", [n], queue=queue), Expect(TaskState.SUCCEEDED, n * n))
    for n in range(300):
        seconds = rng.uniform(0.05, 0.3)
        add(make_spec("slow_square", [n, seconds], queue=queue), Expect(TaskState.SUCCEEDED, n * n))
    for n in range(300):  # ready a few seconds in: some before the crash, some after
        delay_s = rng.uniform(1.0, 6.0)
        spec = make_spec("square", [n], queue=queue, not_before=now + delay_s)
        add(spec, Expect(TaskState.SUCCEEDED, n * n))
    for n in range(300):  # fail attempts 1 and 2, succeed on 3: in backoff at the crash
        spec = make_spec("square_after_failures", [n, 2], queue=queue, max_attempts=3)
        add(spec, Expect(TaskState.SUCCEEDED, n * n))
    for n in range(80):  # never succeed within their 2 attempts
        spec = make_spec("square_after_failures", [n, 99], queue=queue, max_attempts=2)
        add(spec, Expect(TaskState.FAILED, "ValueError"))
    rng.shuffle(specs)
    return specs


def far_delayed(queue: str, count: int) -> list[TaskSpec]:
    """Tasks that would wait an hour: the test cancels them."""
    return [
        make_spec("square", [n], queue=queue, not_before=time.time() + 3_600) for n in range(count)
    ]


def late_batches(queue: str, batches: int, size: int) -> list[list[tuple[TaskSpec, Expect]]]:
    """Squares a producer submits while the master dies, with idempotency keys so a
    batch whose answer was lost can be sent again without duplicates."""
    return [
        [
            (
                make_spec("square", [n], queue=queue, idempotency_key=f"{queue}-late-{n}"),
                Expect(TaskState.SUCCEEDED, n * n),
            )
            for n in range(b * size, (b + 1) * size)
        ]
        for b in range(batches)
    ]


def final_view(task: Task) -> tuple[Any, ...]:
    """Everything a second recording of a final state would change."""
    error = (task.error.type, task.error.message) if task.error else None
    return (task.state, task.result, error, task.attempts, task.worker_id, task.finished_at)


# -- threads that keep talking to the master through its crash --------------------------


class FinalWatch:
    """Records the first final state the master reports for each watched task.

    A thread asks WaitTasks for the tasks not yet seen final, again and again;
    when the master is gone it opens a new client and asks again.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.first: dict[str, Task] = {}
        self.failed_calls = 0
        self.error: BaseException | None = None
        self._unseen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="final-watch", daemon=True)
        self._thread.start()

    def watch(self, task_ids: Sequence[str]) -> None:
        with self._lock:
            self._unseen.update(i for i in task_ids if i not in self.first)

    def seen(self) -> dict[str, Task]:
        with self._lock:
            return dict(self.first)

    def stop(self) -> None:
        """Stop the thread; raises what went wrong in it, if anything did."""
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the watcher did not stop"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread, whatever happened (for teardown)."""
        self._stop.set()
        self._thread.join(WAIT_S)

    def _run(self) -> None:
        client = Client(self.address)
        try:
            while not self._stop.is_set():
                with self._lock:
                    task_ids = list(self._unseen)
                if not task_ids:
                    self._stop.wait(0.05)  # a polling interval, not a synchronisation
                    continue
                try:
                    for task in client.wait(task_ids, timeout_s=0.5):
                        with self._lock:
                            self.first.setdefault(task.id, task)
                            self._unseen.discard(task.id)
                except TaskfleetError:
                    # The master is down or restarting: a fresh channel does not
                    # wait out the old one's reconnect backoff.
                    self.failed_calls += 1
                    client.close()
                    client = Client(self.address)
                    self._stop.wait(0.05)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            client.close()


class Producer:
    """Submits batches from a thread; a batch that fails is sent again (same
    idempotency keys) until the master takes it, so every batch ends acknowledged."""

    def __init__(self, address: str, batches: list[list[TaskSpec]], watch: FinalWatch) -> None:
        self.address = address
        self.batches = batches
        self.watch = watch
        self.acked: list[list[str]] = []
        self.failed_calls = 0
        self.error: BaseException | None = None
        self.some_acked = threading.Event()
        self._pause = threading.Event()  # never set: an interruptible sleep
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()

    def join(self) -> list[list[str]]:
        self._thread.join(FINAL_WAIT_S)
        assert not self._thread.is_alive(), "the producer never got its batches in"
        if self.error is not None:
            raise self.error
        return self.acked

    def _run(self) -> None:
        client = Client(self.address)
        deadline = time.monotonic() + FINAL_WAIT_S
        try:
            for batch in self.batches:
                while True:
                    try:
                        task_ids = client.submit_many(batch)
                        break
                    except TaskfleetError:
                        self.failed_calls += 1
                        assert time.monotonic() < deadline, "the master never came back"
                        client.close()
                        client = Client(self.address)
                        self._pause.wait(0.05)  # retry pacing while the master is down
                assert len(task_ids) == len(batch)
                self.acked.append(task_ids)
                self.watch.watch(task_ids)
                if len(self.acked) == 3:
                    self.some_acked.set()
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.some_acked.set()
            client.close()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[list[Path]]:
    """Files ``block_until`` tasks wait for; all opened at teardown."""
    made: list[Path] = []
    yield made
    for gate in made:
        gate.touch()


def started(gate: Path, attempt: int = 1) -> bool:
    marker = Path(f"{gate}.started-{attempt}")
    return marker.exists() and bool(marker.read_text())


def queue_counts(client: Client, queue: str) -> dict[TaskState, int]:
    for counts in client.stats().queues:
        if counts.queue == queue:
            return counts.counts
    return dict.fromkeys(TaskState, 0)


def worker_ids_by_pid(client: Client, workers: Sequence[WorkerProc]) -> dict[int, str] | None:
    """The ids of ``workers`` as the master lists them, or None while any is missing."""
    listed = {w.pid: w.worker_id for w in client.stats().workers}
    if not all(w.pid in listed for w in workers):
        return None
    return {w.pid: listed[w.pid] for w in workers}


# -- the story ------------------------------------------------------------------------


def test_kill_9_of_a_busy_sqlite_master_loses_nothing_and_finishes_nothing_twice(
    start_master: StartMaster,
    start_worker: StartWorker,
    tmp_path: Path,
    queue_name: str,
    gates: list[Path],
) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "crash.db"

    # Given a SQLite master with a process-pool worker and a thread-pool worker
    master = start_master(store=f"sqlite:{db}")
    workers = [
        start_worker(master, queues=queue_name, pool="process", concurrency=2),
        start_worker(master, queues=queue_name, pool="thread", concurrency=4),
    ]
    client = master.client()
    watch = FinalWatch(master.address)
    expected: dict[str, Expect] = {}
    try:
        ids_before = poll(lambda: worker_ids_by_pid(client, workers), WAIT_S, "both workers")

        # ...two tasks held RUNNING by gates, ~2,200 tasks of every kind behind
        # them, and 20 tasks delayed by an hour, half of them cancelled
        gates += [tmp_path / "gate-1", tmp_path / "gate-2"]
        gated = client.submit_many(
            make_spec("block_until", [str(g)], queue=queue_name) for g in gates
        )
        expected.update(dict.fromkeys(gated, Expect(TaskState.SUCCEEDED, "released")))
        poll(lambda: all(map(started, gates)), WAIT_S, "the gated tasks to start")
        mixed = mixed_specs(queue_name, rng)
        mixed_ids = client.submit_many(spec for spec, _ in mixed)
        expected.update(zip(mixed_ids, (expect for _, expect in mixed), strict=True))
        parked = client.submit_many(far_delayed(queue_name, 20))
        expected.update(dict.fromkeys(parked, Expect(TaskState.CANCELLED)))
        for task_id in parked[:10]:
            assert client.cancel(task_id).state == TaskState.CANCELLED
        watch.watch(list(expected))

        # ...and the run well under way: hundreds done, many still to do
        poll(
            lambda: queue_counts(client, queue_name)[TaskState.SUCCEEDED] >= 400,
            WAIT_S,
            "400 tasks to succeed",
        )

        # When a producer is submitting 80 more batches and the master is killed
        # with SIGKILL as soon as it got its third batch in
        at_crash = queue_counts(client, queue_name)
        late = late_batches(queue_name, batches=80, size=10)
        producer = Producer(master.address, [[s for s, _ in b] for b in late], watch)
        assert producer.some_acked.wait(WAIT_S)
        master.kill()
        acked_at_crash = [i for batch in producer.acked for i in batch]

        # Then the run was caught in the middle (counts just before the kill): tasks
        # done, running, pending, cancelled...
        assert at_crash[TaskState.SUCCEEDED] >= 400
        assert at_crash[TaskState.RUNNING] >= len(gated)
        assert at_crash[TaskState.PENDING] > 0
        assert at_crash[TaskState.CANCELLED] == 10
        # ...and while no master runs, the file holds every submit acknowledged so far
        store = SqliteStore(str(db))
        try:
            on_disk = store.get_many([*expected, *acked_at_crash])
        finally:
            store.close()
        assert len(on_disk) == len(expected) + len(acked_at_crash)
        # ...with every final state the master reported before it died, as reported
        seen_before = watch.seen()
        assert seen_before, "no task was seen final before the crash"
        assert [final_view(t) for t in on_disk if t.id in seen_before] == [
            final_view(seen_before[t.id]) for t in on_disk if t.id in seen_before
        ]

        # When a new master starts on the same port and file
        master = start_master(store=f"sqlite:{db}", port=master.port)
        client.close()
        client = master.client()

        # Then the same worker processes reconnect by themselves, under the same ids
        ids_after = poll(lambda: worker_ids_by_pid(client, workers), WAIT_S, "workers back")
        assert ids_after == ids_before
        assert all(w.popen.poll() is None for w in workers)

        # And the producer got every batch in; the tasks parked for an hour can
        # still be cancelled; the gates open
        for batch, ids in zip(late, producer.join(), strict=True):
            expected.update(zip(ids, (expect for _, expect in batch), strict=True))
        watch.watch(list(expected))
        for task_id in parked[10:]:
            assert client.cancel(task_id).state == TaskState.CANCELLED
        for gate in gates:
            gate.touch()

        # Then every task reaches a final state...
        task_ids = list(expected)
        assert len(set(task_ids)) == len(task_ids) == 2 + 2_180 + 20 + 800
        final = {t.id: t for t in client.wait(task_ids, FINAL_WAIT_S)}
        missing = [i for i in task_ids if i not in final]
        assert not missing, f"{len(missing)} tasks not final, e.g. {client.get(missing[0])}"

        # ...the one its kind was built for, with the right result or error
        for task_id, expect in expected.items():
            task = final[task_id]
            assert task.state == expect.state, (task, expect)
            if expect.state == TaskState.SUCCEEDED:
                assert task_result(task) == expect.value, task
            elif expect.state == TaskState.FAILED:
                assert task.error is not None and task.error.type == expect.value, task

        # ...and none was ever finished twice: what the watcher saw first, before
        # or after the crash, is what the master reports now, read after read
        poll(lambda: len(watch.seen()) == len(task_ids), WAIT_S, "the watcher to see every task")
        watch.stop()
        first_seen = watch.seen()
        for reread in (final, {t.id: t for t in client.wait(task_ids, 0)}):
            changed = [i for i in task_ids if final_view(reread[i]) != final_view(first_seen[i])]
            assert not changed, f"{len(changed)} final states rewritten, e.g. {changed[:3]}"

        # And GetStats agrees with the tasks
        states = Counter(t.state for t in final.values())
        assert queue_counts(client, queue_name) == {s: states.get(s, 0) for s in TaskState}
        print(
            f"at the crash: { {s.name: n for s, n in at_crash.items()} }; "
            f"producer: {len(acked_at_crash) // 10} of {len(late)} batches in before the kill, "
            f"{producer.failed_calls} calls failed after the client's own retries; "
            f"watcher calls failed: {watch.failed_calls}"
        )
    finally:
        watch.close()
        client.close()
