"""The worker's side of the worker protocol, wired together: one stream to the
master (connection.py), the leases held (lease_book.py), when outcomes and
credit go out (batches.py, credit.py), and how an attempt is reported
(outcomes.py).

Threads: ``connection`` holds the stream and applies what the master sends;
``sender`` batches outcomes, asks for credit and heartbeats; the pool calls
``_on_done`` from its own thread, which sends the batch itself when the pool has
gone idle. The main thread only waits for signals. One lock, ``_lock``,
guards the book, the batches, the credit and the connection's outbox; its
waiters are the sender and a drain.
"""

from __future__ import annotations

import logging
import threading
import time

from taskfleet.common.config import WorkerConfig
from taskfleet.common.errors import ConfigError
from taskfleet.common.identity import process_name
from taskfleet.common.model import LeaseRef, Outcome
from taskfleet.common.shutdown import EXIT_GRACE_EXPIRED, on_stop_signals
from taskfleet.v1 import worker_pb2
from taskfleet.worker import messages
from taskfleet.worker.batches import GATHER_S, Batch, Batches
from taskfleet.worker.connection import Connection
from taskfleet.worker.credit import Credit
from taskfleet.worker.execute import Job, JobResult
from taskfleet.worker.lease_book import Finished, LeaseBook
from taskfleet.worker.metrics import WorkerMetrics
from taskfleet.worker.outcomes import log_context, log_outcome, outcome_label, outcome_of
from taskfleet.worker.pool import Pool, abandon_broken
from taskfleet.worker.pools import make_pool
from taskfleet.worker.registry import TaskDefinition
from taskfleet.worker.task_context import set_progress_sink

log = logging.getLogger("taskfleet.worker")

# At most one progress batch this often: each task's latest update in it.
PROGRESS_INTERVAL_S = 0.25


class Worker:
    """One worker process: its connection, pool and leases, wired together."""

    def __init__(self, config: WorkerConfig, registry: dict[str, TaskDefinition]) -> None:
        self.config = config
        self.worker_id = process_name()
        self.pool: Pool = make_pool(config.pool, config.slots, config.tasks, self._on_done)
        self._lock = threading.Condition()
        self.book = LeaseBook()
        self.credit = Credit(self.pool.size, config.prefetch, gather_s=GATHER_S)
        self.batches = Batches(self.book, self.credit)
        self.stopped = threading.Event()  # set when the connection loop must end
        self._progress: dict[LeaseRef, tuple[float, str]] = {}  # latest, not yet sent
        self._progress_due = 0.0  # monotonic time the next progress batch may go
        self.connection = Connection(
            config, self.worker_id, registry, self._lock, self, self.stopped
        )
        self.metrics = (
            WorkerMetrics(self._lock, self._busy_slots, self.pool.size)
            if config.metrics_listen
            else None
        )

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; returns the exit code."""
        if self.metrics is not None:
            try:
                self.metrics.serve(self.config.metrics_listen)
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-listen: cannot bind {self.config.metrics_listen} ({exc.strerror})"
                ) from None
        set_progress_sink(self._on_progress)
        self.pool.start()
        threads = [
            threading.Thread(target=self.connection.run, name="connection", daemon=True),
            threading.Thread(target=self._send_forever, name="sender", daemon=True),
        ]
        for thread in threads:
            thread.start()
        signalled = threading.Event()
        on_stop_signals(signalled, log, "draining")
        print(f"taskfleet worker {self.worker_id} serving {self.connection.masters}", flush=True)
        while not signalled.wait(0.5):
            if self.connection.refused is not None:
                # Retrying cannot help: the master refuses this worker as it is set up.
                self.stopped.set()
                self.pool.close(wait=False)
                raise self.connection.refused
            if self.pool.failure is not None:
                self.stopped.set()
                self.connection.send(None)  # the stream closes; the master lets the leases lapse
                return abandon_broken(self.pool)
        return self.drain()

    def drain(self) -> int:
        """Take no new tasks, hand back prefetched ones, let running ones finish and
        report within the grace period, then stop."""
        with self._lock:
            unstarted = self.book.drain()
            self._lock.notify_all()
        if unstarted:
            self.connection.send(messages.release(unstarted))
        deadline = time.monotonic() + self.config.grace_s
        with self._lock:
            settled = self._lock.wait_for(
                lambda: not self.book.running and self.batches.settled(),
                timeout=deadline - time.monotonic(),
            )
        if settled:
            log.info("drained: every task finished and reported")
        else:
            log.warning("grace period over with tasks unfinished; their leases will lapse")
        self.stopped.set()
        self.connection.send(None)
        self.pool.close(wait=False)
        if self.metrics is not None:
            self.metrics.close()
        return 0 if settled else EXIT_GRACE_EXPIRED

    # -- what the master sends (connection.Peer) -----------------------------

    def greeting(self) -> tuple[list[LeaseRef], list[Batch]]:
        """Every lease this worker holds, for the Hello: running, prefetched, or with
        its outcome not yet acknowledged; and the batches to send again."""
        return self.book.held() + self.batches.held(), self.batches.to_resend()

    def connected(self) -> None:
        self.credit.new_stream()

    def ack(self, seq: int) -> None:
        with self._lock:
            if self.batches.ack(seq, time.monotonic()):
                # The next batch waited for this ack; a drain waits for the last one.
                self._lock.notify_all()

    def accept(self, jobs: list[Job]) -> None:
        with self._lock:
            self.credit.arrived(len(jobs), sum(len(job.payload) for job in jobs))
            unwanted = self.book.accept(jobs)
            self._start_prefetched()
        if unwanted:
            self.connection.send(messages.release(unwanted))

    def revoke(self, refs: list[LeaseRef]) -> None:
        with self._lock:
            running = self.book.revoke(refs)
            self.batches.drop(set(refs))
        for job in running:
            with log_context(job):
                log.info("stopping task %s: cancelled or lease lost", job.ref.task_id)
            self.pool.cancel(job.ref)

    # -- the pool ------------------------------------------------------------

    def _start_prefetched(self) -> None:
        """Move prefetched jobs into free pool slots. Called with the lock held."""
        starting = self.book.start(self.pool.free_slots())
        if starting:
            self.pool.submit(starting)

    def _on_done(self, results: list[JobResult]) -> None:
        done: list[tuple[Job, JobResult, Outcome]] = []
        with self._lock:
            now = time.monotonic()
            wanted: list[Outcome] = []
            for result in results:
                finished = self.book.finish(result.ref)
                if finished is not None:
                    outcome = self._record(finished, result)
                    done.append((finished.job, result, outcome))
                    if finished.wanted:
                        wanted.append(outcome)
            news = self.batches.add(wanted, now)
            self._start_prefetched()
            outbox = self.connection.outbox
            # A pool gone idle sends at once, from here: waking the sender
            # thread would add a hand-off to a lone task's round trip.
            idle = not self.book.running
            batch = self.batches.take(now) if idle and outbox is not None else None
            progress = self._take_progress(now, True) if batch is not None else None
            if batch is None and (idle or news):
                # The sender learns of an idle pool (a drain waits for the last job
                # too), and, unless an ack will wake it anyway, of the first
                # outcomes (to time the gathering) and of a full batch.
                self._lock.notify_all()
        if progress is not None and outbox is not None:
            outbox.put(progress)
        if batch is not None and outbox is not None:
            outbox.put(messages.results(*batch))
        for job, result, outcome in done:
            log_outcome(job, result, outcome)  # outside the lock: may block on I/O

    def _record(self, finished: Finished, result: JobResult) -> Outcome:
        """Count a finished job and return its outcome. Called with the lock held."""
        job = finished.job
        outcome = outcome_of(job, result, self.config.max_result_bytes)
        self.credit.job_took(finished.run_s)
        if self.metrics is not None:
            self.metrics.task_done(job.name, outcome_label(job, outcome), finished.run_s)
        return outcome

    def _busy_slots(self) -> int:
        """Slots running a task: jobs handed to the pool, or threads still busy with a
        job already reported (a thread pool's timed-out task runs on)."""
        size = self.pool.size
        return min(size, max(len(self.book.running), size - self.pool.free_slots()))

    def _on_progress(self, ref: LeaseRef, fraction: float, message: str) -> None:
        with self._lock:
            if ref not in self.book.running:
                return  # finished, revoked or never ours: the master would ignore it
            first = not self._progress
            self._progress[ref] = (fraction, message)
            if first:
                self._lock.notify_all()

    def _take_progress(self, now: float, with_outcomes: bool) -> worker_pb2.WorkerMessage | None:
        """The progress message to send now, if any is due, or goes ahead of a batch
        of outcomes (so a finished task's last update is not lost behind its
        outcome, which ends its lease). Called with the lock held."""
        if not self._progress or (now < self._progress_due and not with_outcomes):
            return None
        updates, self._progress = self._progress, {}
        self._progress_due = now + PROGRESS_INTERVAL_S
        return messages.progress(updates)

    # -- sending -------------------------------------------------------------

    def _send_forever(self) -> None:
        """Send batches when due, top up credit, and heartbeat, until stopped."""
        connection = self.connection
        next_heartbeat = time.monotonic()
        while not self.stopped.is_set():
            with self._lock:
                while not self.stopped.is_set():
                    now = time.monotonic()
                    if connection.outbox is not None and self.batches.ready(now):
                        break
                    wait_s = next_heartbeat - now
                    if self._progress:
                        wait_s = min(wait_s, self._progress_due - now)
                    gather_s = self.batches.wait_s(now)
                    if gather_s is not None:
                        wait_s = min(wait_s, gather_s)
                    if wait_s <= 0:
                        break
                    self._lock.wait(wait_s)
                outbox = connection.outbox
                if outbox is None:  # between streams: the next Hello carries the leases
                    self._lock.wait(connection.heartbeat_s)
                    continue
                messages_out: list[worker_pb2.WorkerMessage] = []
                batch = self.batches.take(time.monotonic())
                progress = self._take_progress(time.monotonic(), batch is not None)
                credit = 0 if batch is not None else self.batches.take_credit()
                if credit:
                    messages_out.append(messages.credit(credit))
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + connection.heartbeat_s
                    connection.check_alive()
                    # A thread pool frees the slot of a timed-out or cancelled
                    # task only when its function returns, without telling us.
                    self._start_prefetched()
                    held = self.book.held() + self.batches.held()
                    messages_out.append(messages.heartbeat(held))
            if progress is not None:
                outbox.put(progress)
            if batch is not None:
                outbox.put(messages.results(*batch))
            for message in messages_out:
                outbox.put(message)
