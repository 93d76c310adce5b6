"""Bounded soak: 20,000 tasks with injected failures, pool-process crashes and
time-outs, while a chaos loop SIGKILLs workers at random and starts new ones.

Thread-pool workers serve the bulk queue; a process-pool worker serves the
"hard" queue, whose tasks kill their own pool process or overrun their time
limit on the first attempt. Every kind of task is built to end one known way,
so the end state is exact however the kills fall: the tasks made to always
fail are FAILED, every other task SUCCEEDED with the right result.

The run takes 20-30 s on two cores (each crash or overrun costs a pool
process, and spawning one is the dearest thing here, so there are few of
them). The chaos loop is seeded (victims and pauses), bounded in kills and in
time, and always leaves at least one worker running.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.model import Task, TaskSpec, TaskState

from procs import MasterProc, WorkerProc, poll

SEED = 7
FINAL_WAIT_S = 120.0  # every task final; the run itself takes a fraction of this
CHAOS_MAX_KILLS = 12
CHAOS_MAX_S = 40.0
CHAOS_PAUSE_S = (0.3, 1.5)  # between kills, drawn from the seeded random

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


@dataclass(frozen=True)
class Kind:
    """One kind of task: how many, how it must end, and its fewest possible attempts."""

    name: str
    count: int
    queue: str  # "bulk" or "hard"
    state: TaskState
    min_attempts: int

    def spec(self, n: int, queue_prefix: str, rng: random.Random) -> TaskSpec:
        queue = f"{queue_prefix}-{self.queue}"
        if self.name == "square":
            return make_spec("square", [n], queue=queue)
        if self.name == "slow_square":
            return make_spec("slow_square", [n, rng.uniform(0.005, 0.05)], queue=queue)
        if self.name == "fails_twice":  # attempts 1 and 2 raise, attempt 3 succeeds
            return make_spec("square_after_failures", [n, 2], queue=queue, max_attempts=3)
        if self.name == "always_fails":
            return make_spec("square_after_failures", [n, 99], queue=queue, max_attempts=2)
        if self.name == "crashes_first":  # os._exit in its pool process on attempt 1
            return make_spec("square_crash_first", [n], queue=queue, max_attempts=3)
        if self.name == "overruns_first":  # sleeps 10 s on attempt 1, limit 1.5 s
            return make_spec(
                "square_slow_first", [n, 10.0], queue=queue, max_attempts=3, timeout_s=1.5
            )
        raise AssertionError(self.name)


KINDS = [
    Kind("square", 12_760, "bulk", TaskState.SUCCEEDED, 1),
    Kind("slow_square", 5_000, "bulk", TaskState.SUCCEEDED, 1),
    Kind("fails_twice", 1_500, "bulk", TaskState.SUCCEEDED, 3),
    Kind("always_fails", 600, "bulk", TaskState.FAILED, 2),
    Kind("crashes_first", 100, "hard", TaskState.SUCCEEDED, 2),
    Kind("overruns_first", 40, "hard", TaskState.SUCCEEDED, 2),
]
TOTAL = sum(k.count for k in KINDS)


def final_view(task: Task) -> tuple[Any, ...]:
    error = (task.error.type, task.error.message) if task.error else None
    return (task.state, task.result, error, task.attempts, task.worker_id, task.finished_at)


class Chaos:
    """SIGKILLs a random worker and starts one like it, again and again, from a
    thread, until stopped or out of kills or time. Never kills the last worker."""

    def __init__(
        self, rng: random.Random, workers: dict[WorkerProc, Callable[[], WorkerProc]]
    ) -> None:
        self.rng = rng
        self.workers = workers  # each live worker, with how to start one like it
        self.kills = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop; returns how many workers were killed, or raises what went wrong."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the chaos loop did not stop"
        if self.error is not None:
            raise self.error
        return self.kills

    def _run(self) -> None:
        deadline = time.monotonic() + CHAOS_MAX_S
        try:
            while self.kills < CHAOS_MAX_KILLS and time.monotonic() < deadline:
                if self._stop.wait(self.rng.uniform(*CHAOS_PAUSE_S)):
                    return
                alive = [w for w in self.workers if w.popen.poll() is None]
                assert len(alive) >= 2, f"only {len(alive)} workers alive"
                victim = self.rng.choice(sorted(alive, key=lambda w: w.args))
                start_like = self.workers.pop(victim)
                victim.kill()
                self.kills += 1
                replacement = start_like()  # returns once the master lists it
                self.workers[replacement] = start_like
        except BaseException as exc:  # reported by stop()
            self.error = exc


@pytest.mark.soak
@pytest.mark.timeout(240)
def test_soak_20000_tasks_with_injected_faults_while_workers_are_killed_at_random(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str
) -> None:
    rng = random.Random(SEED)
    bulk, hard = f"{queue_name}-bulk", f"{queue_name}-hard"

    # Given three thread-pool workers on the bulk queue and a process-pool
    # worker on the hard queue
    def bulk_worker() -> WorkerProc:
        return start_worker(
            master, queues=bulk, pool="thread", concurrency=8, extra=["--prefetch", "4"]
        )

    def hard_worker() -> WorkerProc:
        return start_worker(master, queues=hard, pool="process", concurrency=8)

    workers = {bulk_worker(): bulk_worker for _ in range(3)}
    workers[hard_worker()] = hard_worker

    # ...and 20,000 tasks of every kind, mixed
    specs: list[tuple[TaskSpec, Kind, int]] = [
        (kind.spec(n, queue_name, rng), kind, n) for kind in KINDS for n in range(kind.count)
    ]
    rng.shuffle(specs)
    assert len(specs) == TOTAL == 20_000

    # When they are submitted in batches while workers are SIGKILLed and
    # replaced at random
    chaos = Chaos(random.Random(SEED + 1), workers)
    started = time.monotonic()
    chaos.start()
    try:
        task_ids = client.submit_many(spec for spec, _, _ in specs)
        assert len(set(task_ids)) == TOTAL

        # Then every task reaches a final state
        final = {t.id: t for t in client.wait(task_ids, FINAL_WAIT_S)}
    finally:
        kills = chaos.stop()
    elapsed_s = time.monotonic() - started
    missing = [i for i in task_ids if i not in final]
    assert not missing, f"{len(missing)} tasks not final, e.g. {client.get(missing[0])}"
    assert kills >= 1, "the chaos loop never killed a worker"

    # ...each as its kind was built to end: failures exactly where injected to
    # be final, right results everywhere else, and every injected fault seen
    # (a task made to fail on early attempts needed more attempts than that)
    ends: Counter[tuple[str, TaskState]] = Counter()
    for task_id, (_, kind, n) in zip(task_ids, specs, strict=True):
        task = final[task_id]
        ends[kind.name, task.state] += 1
        assert task.state == kind.state, (kind.name, task)
        assert task.attempts >= kind.min_attempts, (kind.name, task)
        if kind.state == TaskState.SUCCEEDED:
            assert task_result(task) == n * n, (kind.name, task)
        else:
            assert task.error is not None and task.error.type == "ValueError", task
    assert ends == Counter({(k.name, k.state): k.count for k in KINDS})

    # And GetStats agrees with the tasks, queue by queue, and lists exactly the
    # workers still running (none of the killed ones lingers)
    live = {w.pid for w in chaos.workers}
    assert len(live) == 4
    poll(
        lambda: {w.pid for w in client.stats().workers} == live,
        30,
        "stats to list exactly the live workers",
    )
    by_queue: dict[str, Counter[TaskState]] = {bulk: Counter(), hard: Counter()}
    for task_id, (spec, _, _) in zip(task_ids, specs, strict=True):
        by_queue[spec.queue][final[task_id].state] += 1
    stats = {q.queue: q.counts for q in client.stats().queues}
    for queue, states in by_queue.items():
        assert stats[queue] == {s: states.get(s, 0) for s in TaskState}, queue

    # And a final state, once reported, never changes
    reread = {t.id: t for t in client.wait(task_ids, 0)}
    changed = [i for i in task_ids if final_view(reread[i]) != final_view(final[i])]
    assert not changed, f"{len(changed)} final states rewritten, e.g. {changed[:3]}"
    print(f"{TOTAL} tasks final in {elapsed_s:.1f} s with {kills} workers killed")
