"""A pool of threads in the worker process, for IO-bound tasks with many slots."""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence

from taskfleet.common.model import LeaseRef
from taskfleet.worker.execute import Job, run_job
from taskfleet.worker.pool import JobLedger, OnDone, Pool, cancelled, timed_out
from taskfleet.worker.registry import import_task_modules


class ThreadPool(Pool):
    """Runs each job in one of ``size`` threads; ``current_task()`` is per thread.

    Threads cannot be killed, so limits are reported, not enforced: a job past
    its deadline is reported TimeLimitExceeded at the deadline, a cancelled one
    Cancelled at once, but the function runs on, its late result is dropped,
    and its slot stays taken until it returns (a task that never returns holds
    its slot for good). Nothing signals when such a slot frees up. A task that
    calls ``os._exit`` or crashes the interpreter takes the whole worker with it.
    Use the process pool where hard limits matter.
    """

    def __init__(self, size: int, task_modules: Sequence[str], on_done: OnDone) -> None:
        super().__init__(size, task_modules, on_done)
        self._ledger = JobLedger(on_done)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._slots = threading.Condition()  # guards the two counts below
        self._busy = 0  # jobs whose function has not returned yet
        self._exited = 0  # threads that have left their loop
        self._threads = [
            self._thread(self._work, f"taskfleet-thread-pool-{i}") for i in range(size)
        ]
        self._watchdog = _Watchdog(self._ledger, self._thread)

    def start(self) -> None:
        import_task_modules(self.task_modules)
        for thread in self._threads:
            thread.start()
        self._watchdog.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        self._ledger.add(jobs)
        with self._slots:
            self._busy += len(jobs)
        for job in jobs:
            self._watchdog.watch(job)
            self._jobs.put(job)

    def free_slots(self) -> int:
        with self._slots:
            return max(0, self.size - self._busy)

    def cancel(self, ref: LeaseRef) -> bool:
        if not self._ledger.cancel(ref):
            return False
        self._watchdog.poke()
        return True

    def close(self, wait: bool = True) -> None:
        self._ledger.close(abandon=not wait)
        if wait:
            self._ledger.wait_drained()
        for _ in self._threads:
            self._jobs.put(None)
        self._watchdog.stop()
        if wait:
            # Idle threads take their None and leave; only those stuck in a job
            # already reported (past its deadline, or cancelled) stay behind.
            with self._slots:
                started = sum(t.ident is not None for t in self._threads)
                self._slots.wait_for(lambda: self._exited + self._busy >= started)

    def _work(self) -> None:
        # The counts stay true even if this thread dies of a bug (the pool is then
        # broken), so that close() does not wait for it.
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    # Skip what was cancelled or abandoned while queued.
                    result = run_job(job) if self._ledger.wanted([job]) else None
                finally:
                    with self._slots:
                        self._busy -= 1
                        self._slots.notify_all()
                if result is not None:
                    self._ledger.finish([result])
        finally:
            with self._slots:
                self._exited += 1
                self._slots.notify_all()


class _Watchdog:
    """Reports jobs past their deadline, and cancelled ones, without waiting for
    the threads that run them."""

    def __init__(
        self, ledger: JobLedger, thread: Callable[[Callable[[], None], str], threading.Thread]
    ) -> None:
        self._ledger = ledger
        self._changed = threading.Condition()
        self._deadlines: list[tuple[float, int, Job]] = []  # a heap
        self._order = itertools.count()  # breaks ties: jobs do not compare
        self._poked = False
        self._stopped = False
        self._thread = thread(self._run, "taskfleet-thread-pool-watchdog")

    def start(self) -> None:
        self._thread.start()

    def watch(self, job: Job) -> None:
        if job.deadline is None:
            return
        with self._changed:
            # Finished jobs stay in the heap until their deadline; sweep them out
            # before long timeouts on short tasks pile up.
            if len(self._deadlines) > 2 * len(self._ledger) + 64:
                self._deadlines = [e for e in self._deadlines if self._ledger.wanted([e[2]])]
                heapq.heapify(self._deadlines)
            heapq.heappush(self._deadlines, (job.deadline, next(self._order), job))
            self._changed.notify()

    def poke(self) -> None:
        with self._changed:
            self._poked = True
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                # Not wait_for: a new, earlier deadline must shorten the wait.
                while not (self._stopped or self._poked or self._due()):
                    self._changed.wait(self._timeout())
                if self._stopped:
                    return
                self._poked = False
                expired = []
                now = time.time()
                while self._deadlines and self._deadlines[0][0] <= now:
                    expired.append(heapq.heappop(self._deadlines)[2])
            self._ledger.finish(
                [*map(cancelled, self._ledger.cancelling()), *map(timed_out, expired)]
            )

    def _due(self) -> bool:
        return bool(self._deadlines) and self._deadlines[0][0] <= time.time()

    def _timeout(self) -> float | None:
        return max(0.0, self._deadlines[0][0] - time.time()) if self._deadlines else None
