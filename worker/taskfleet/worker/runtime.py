"""The worker's side of the worker protocol: one stream to the master, kept
alive across reconnects, feeding the local pool and reporting outcomes.

Threads: ``connection`` holds the stream and applies what the master sends;
``sender`` batches outcomes, asks for credit and heartbeats; the pool calls
``_on_done`` from its own thread, which sends the batch itself when the pool has
gone idle. The main thread only waits for signals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager

import grpc

from taskfleet.common import convert
from taskfleet.common.batching import cut, outcome_bytes
from taskfleet.common.channel import open_channel
from taskfleet.common.config import WorkerConfig
from taskfleet.common.context import bound_context, clipped
from taskfleet.common.errors import (
    ConfigError,
    InvalidArgument,
    TaskfleetError,
    Unauthenticated,
    from_rpc_error,
)
from taskfleet.common.model import LeaseRef, Outcome, TaskError, TaskState
from taskfleet.common.reconnect import first_reconnect_s, reconnect_policy
from taskfleet.common.result_limit import limit_outcome
from taskfleet.common.shutdown import on_stop_signals
from taskfleet.v1 import worker_pb2, worker_pb2_grpc
from taskfleet.worker.execute import Job, JobResult
from taskfleet.worker.metrics import WorkerMetrics
from taskfleet.worker.pool import Pool, abandon_broken
from taskfleet.worker.pools import make_pool
from taskfleet.worker.registry import TaskDefinition

log = logging.getLogger("taskfleet.worker")

EXIT_GRACE_EXPIRED = 1  # drained, but some tasks were still running after the grace
CONNECT_TIMEOUT_S = 5.0  # how long to wait for the master's Welcome
AVERAGE_WEIGHT = 0.1  # weight of the newest sample in the moving averages
GATHER_S = 0.005  # how long outcomes may gather into one batch while the pool is busy
GATHER_MAX = 500  # ... and how many at most (and batching.BATCH_BYTES at most)
SILENCE_HEARTBEATS = 3  # heartbeat intervals without a word before the stream counts as dead


class StreamEnded(Exception):
    """The stream to the master ended; the worker reconnects."""


class Worker:
    """One worker process: connection, pool and bookkeeping of held leases."""

    def __init__(self, config: WorkerConfig, registry: dict[str, TaskDefinition]) -> None:
        self.config = config
        self.registry = registry
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.pool: Pool = make_pool(config.pool, config.slots, config.tasks, self._on_done)
        self._lock = threading.Condition()
        self._running: dict[LeaseRef, Job] = {}
        self._prefetched: deque[Job] = deque()
        self._revoked: set[LeaseRef] = set()
        self._outcomes: list[Outcome] = []  # finished, not yet sent
        self._gather_until = 0.0  # when the oldest of _outcomes must be sent
        self._unacked: dict[int, list[Outcome]] = {}  # sent, not yet acknowledged
        self._seq = 0
        # Moving averages that size the prefetch: how long a job holds its place
        # in the pool, and how long the master takes to acknowledge results.
        self._job_s: float | None = None
        self._round_trip_s: float | None = None
        self._submitted_at: dict[LeaseRef, float] = {}
        self._sent_at: dict[int, float] = {}
        self._requested = 0  # credit asked for on the current stream, not yet used
        self._outbox: queue.SimpleQueue[worker_pb2.WorkerMessage | None] | None = None
        self._heartbeat_s = 2.0
        self._stream: grpc.CallIterator[worker_pb2.MasterMessage] | None = (
            None  # the current call, to cancel a silent one
        )
        self._last_heard = time.monotonic()  # when the master last sent anything
        self.draining = threading.Event()
        self._refused: TaskfleetError | None = None  # the master refuses this worker
        self.stopped = threading.Event()  # set when the connection loop must end
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
        self.pool.start()
        threads = [
            threading.Thread(target=self._connect_forever, name="connection", daemon=True),
            threading.Thread(target=self._send_forever, name="sender", daemon=True),
        ]
        for thread in threads:
            thread.start()
        signalled = threading.Event()
        on_stop_signals(signalled, log, "draining")
        print(f"taskfleet worker {self.worker_id} serving {self.config.master}", flush=True)
        while not signalled.wait(0.5):
            if self._refused is not None:
                # Retrying cannot help: the master refuses this worker as it is set up.
                self.stopped.set()
                self.pool.close(wait=False)
                raise self._refused
            if self.pool.failure is not None:
                self.stopped.set()
                self._send(None)  # the stream closes; the master lets the leases lapse
                return abandon_broken(self.pool)
        return self.drain()

    def drain(self) -> int:
        """Take no new tasks, hand back prefetched ones, let running ones finish and
        report within the grace period, then stop."""
        self.draining.set()
        with self._lock:
            unstarted = list(self._prefetched)
            self._prefetched.clear()
            self._lock.notify_all()
        if unstarted:
            self._send(
                worker_pb2.WorkerMessage(
                    release=worker_pb2.Release(
                        leases=[convert.ref_to_proto(j.ref) for j in unstarted]
                    )
                )
            )
        deadline = time.monotonic() + self.config.grace_s
        with self._lock:
            settled = self._lock.wait_for(
                lambda: not (self._running or self._outcomes or self._unacked),
                timeout=deadline - time.monotonic(),
            )
        if settled:
            log.info("drained: every task finished and reported")
        else:
            log.warning("grace period over with tasks unfinished; their leases will lapse")
        self.stopped.set()
        self._send(None)
        self.pool.close(wait=False)
        if self.metrics is not None:
            self.metrics.close()
        return 0 if settled else EXIT_GRACE_EXPIRED

    # -- connection ----------------------------------------------------------

    def _connect_forever(self) -> None:
        while not self.stopped.is_set():
            retrying = reconnect_policy(
                _worth_retrying,
                lambda exc: log.warning(
                    "master %s unreachable (%s); retrying", self.config.master, _rpc_reason(exc)
                ),
            )
            try:
                retrying(self._serve_stream)
            except grpc.RpcError as exc:  # not retried: refused for good
                self._refused = from_rpc_error(exc)
                return
            except StreamEnded as exc:
                if not self.stopped.is_set():
                    log.warning("connection to master lost (%s); reconnecting", exc)
                    self.stopped.wait(first_reconnect_s())

    def _serve_stream(self) -> None:
        """One stream: raises RpcError if it never got going, StreamEnded once it had."""
        outbox: queue.SimpleQueue[worker_pb2.WorkerMessage | None] = queue.SimpleQueue()
        with self._lock:
            hello = self._hello()
            resend = [self._results_message(seq, o) for seq, o in sorted(self._unacked.items())]
            self._sent_at.clear()  # a resent batch's round trip would count the outage
        channel = open_channel(self.config.master, self.config.token, tls=self.config.tls)
        try:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            responses = stub.Connect(_requests(hello, outbox))
            # A master that accepts the connection but never answers (a stalled
            # proxy) must not hold the worker: give up on it after a while.
            give_up = threading.Timer(CONNECT_TIMEOUT_S, responses.cancel)
            give_up.start()
            try:
                # The first response raises RpcError when the master is not there.
                welcome = next(iter(responses), None)
            finally:
                give_up.cancel()
            if welcome is None or welcome.WhichOneof("kind") != "welcome":
                raise StreamEnded("master closed the stream before welcoming this worker")
            self._heartbeat_s = convert.seconds_from_duration(welcome.welcome.heartbeat_interval)
            with self._lock:
                self._outbox = outbox
                self._stream = responses
                self._last_heard = time.monotonic()
                self._requested = 0
                self._lock.notify_all()
            for resent in resend:
                outbox.put(resent)
            log.info("connected to master %s", self.config.master)
            try:
                for message in responses:
                    self._last_heard = time.monotonic()
                    self._apply(message)
            except grpc.RpcError as exc:
                raise StreamEnded(_rpc_reason(exc)) from None
            raise StreamEnded("master closed the stream")
        finally:
            with self._lock:
                if self._outbox is outbox:
                    self._outbox = None
                    self._stream = None
            outbox.put(None)
            channel.close()

    def _hello(self) -> worker_pb2.WorkerMessage:
        return worker_pb2.WorkerMessage(
            hello=worker_pb2.Hello(
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self.config.queues,
                task_names=sorted(self.registry),
                concurrency=self.config.slots,
                held=[convert.ref_to_proto(r) for r in self._held()],
            )
        )

    def _apply(self, message: worker_pb2.MasterMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignments":
            assignments = message.assignments
            if assignments.results_ack:
                self._ack(assignments.results_ack)
            self._accept([self._job(a) for a in assignments.assignments])
        elif kind == "revoke":
            self._revoke([convert.ref_from_proto(r) for r in message.revoke.leases])
        elif kind == "results_ack":
            self._ack(message.results_ack.seq)

    def _ack(self, seq: int) -> None:
        """Forget the Results batches up to ``seq``: the master has recorded them."""
        with self._lock:
            sent_at = self._sent_at.pop(seq, None)
            if sent_at is not None:
                self._round_trip_s = _average(self._round_trip_s, time.monotonic() - sent_at)
            while self._unacked and next(iter(self._unacked)) <= seq:
                acked = next(iter(self._unacked))
                del self._unacked[acked]
                self._sent_at.pop(acked, None)
            if not self._unacked and (
                self._outcomes or self._credit_wanted() > 0 or self.draining.is_set()
            ):
                # The next batch waited for this ack; a drain waits for the last one.
                self._lock.notify_all()

    def _job(self, assignment: worker_pb2.Assignment) -> Job:
        task = assignment.task
        spec = task.spec  # once: every protobuf field access has a cost, per task
        definition = self.registry.get(spec.name)
        timeout_s = convert.seconds_from_duration(spec.timeout) if spec.HasField("timeout") else 0.0
        if not timeout_s and definition is not None:
            timeout_s = definition.timeout_s
        return Job(
            ref=convert.ref_from_proto(assignment.lease),
            name=spec.name,
            queue=spec.queue,
            attempt=task.attempts,
            payload=spec.payload,
            content_type=spec.content_type,
            timeout_s=timeout_s,
            deadline=time.time() + timeout_s if timeout_s else None,
            metadata=dict(spec.metadata),
            max_attempts=spec.max_attempts or (definition.max_attempts if definition else 1),
        )

    # -- bookkeeping ---------------------------------------------------------

    def _held(self) -> list[LeaseRef]:
        """Every lease this worker holds: running, prefetched, or with its outcome
        not yet acknowledged. Called with the lock held."""
        refs = list(self._running)
        refs += (j.ref for j in self._prefetched)
        refs += (o.ref for o in self._outcomes)
        refs += (o.ref for batch in self._unacked.values() for o in batch)
        return refs

    def _accept(self, jobs: list[Job]) -> None:
        with self._lock:
            self._requested = max(0, self._requested - len(jobs))
            if not self.draining.is_set():
                self._prefetched.extend(jobs)
                self._start_prefetched()
                return
        # Credit asked for before the drain began: hand these straight back.
        self._send(
            worker_pb2.WorkerMessage(
                release=worker_pb2.Release(leases=[convert.ref_to_proto(j.ref) for j in jobs])
            )
        )

    def _start_prefetched(self) -> None:
        """Move prefetched jobs into free pool slots. Called with the lock held."""
        while self._prefetched and self.pool.free_slots() > 0 and not self.draining.is_set():
            job = self._prefetched.popleft()
            if job.timeout_s:
                # The time limit counts from the start, not from when the job
                # arrived: a prefetched job may have waited for a slot.
                job = dataclasses.replace(job, deadline=time.time() + job.timeout_s)
            self._running[job.ref] = job
            self._submitted_at[job.ref] = time.monotonic()
            self.pool.submit(job)

    def _revoke(self, refs: list[LeaseRef]) -> None:
        with self._lock:
            revoked = set(refs)
            self._prefetched = deque(j for j in self._prefetched if j.ref not in revoked)
            self._outcomes = [o for o in self._outcomes if o.ref not in revoked]
            running = [self._running[r] for r in refs if r in self._running]
            self._revoked.update(job.ref for job in running)
        for job in running:
            with _log_context(job):
                log.info("stopping task %s: cancelled or lease lost", job.ref.task_id)
            self.pool.cancel(job.ref)

    def _on_done(self, result: JobResult) -> None:
        with self._lock:
            job = self._running.pop(result.ref, None)
            submitted_at = self._submitted_at.pop(result.ref, None)
            outcome = None
            if job is not None:
                outcome = limit_outcome(_outcome(job, result), self.config.max_result_bytes)
            if submitted_at is not None:
                run_s = time.monotonic() - submitted_at
                self._job_s = _average(self._job_s, run_s)
                if self.metrics is not None and job is not None and outcome is not None:
                    self.metrics.task_done(job.name, _outcome_label(job, outcome), run_s)
            if outcome is not None and result.ref not in self._revoked:
                self._outcomes.append(outcome)
                if len(self._outcomes) == 1:
                    self._gather_until = time.monotonic() + GATHER_S
            self._revoked.discard(result.ref)
            self._start_prefetched()
            outbox = self._outbox
            # A pool gone idle sends at once, from here: waking the sender
            # thread would add a hand-off to a lone task's round trip.
            batch = None if self._running or outbox is None else self._take_batch()
            if batch is None and (
                not self._running or (not self._unacked and len(self._outcomes) in (1, GATHER_MAX))
            ):
                # The sender learns of an idle pool (a drain waits for the last job
                # too), and, unless an ack will wake it anyway, of the first
                # outcome (to time the gathering) and of a full batch.
                self._lock.notify_all()
        if batch is not None and outbox is not None:
            outbox.put(self._results_message(*batch))
        if job is not None and (not result.ok or log.isEnabledFor(logging.DEBUG)):
            _log_result(job, result)  # outside the lock: logging may block on I/O
        elif job is not None and outcome is not None and outcome.error is not None:
            with _log_context(job):  # a result over --max-result-bytes
                error = outcome.error
                log.warning("task %s failed: %s: %s", job.name, error.type, error.message)

    def _busy_slots(self) -> int:
        """Slots running a task: jobs handed to the pool, or threads still busy with a
        job already reported (a thread pool's timed-out task runs on)."""
        return min(self.pool.size, max(len(self._running), self.pool.size - self.pool.free_slots()))

    # -- sending -------------------------------------------------------------

    def _send(self, message: worker_pb2.WorkerMessage | None) -> None:
        with self._lock:
            outbox = self._outbox
        if outbox is not None:
            outbox.put(message)

    def _send_forever(self) -> None:
        """Batch outcomes, top up credit, and heartbeat, until stopped."""
        next_heartbeat = time.monotonic()
        while not self.stopped.is_set():
            with self._lock:
                while not self.stopped.is_set():
                    now = time.monotonic()
                    if self._outbox is not None and self._ready_to_send(now):
                        break
                    wait_s = next_heartbeat - now
                    if self._outcomes and not self._unacked:
                        wait_s = min(wait_s, self._gather_until - now)
                    if wait_s <= 0:
                        break
                    self._lock.wait(wait_s)
                outbox = self._outbox
                if outbox is None:  # between streams: the next Hello carries the leases
                    self._lock.wait(self._heartbeat_s)
                    continue
                messages: list[worker_pb2.WorkerMessage] = []
                batch = self._take_batch()
                want = self._credit_wanted()
                if batch is None and want > 0 and not self._unacked:
                    self._requested += want
                    messages.append(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=want)))
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self._heartbeat_s
                    self._check_master_alive()
                    # A thread pool frees the slot of a timed-out or cancelled
                    # task only when its function returns, without telling us.
                    self._start_prefetched()
                    held = [convert.ref_to_proto(r) for r in self._held()]
                    messages.append(
                        worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat(held=held))
                    )
            if batch is not None:
                outbox.put(self._results_message(*batch))
            for message in messages:
                outbox.put(message)

    def _take_batch(self) -> tuple[int, list[Outcome], int] | None:
        """The next Results batch (seq, outcomes, credit), if one is due; it counts
        as sent from here. Converted to protobuf by the caller after it lets go
        of the lock (the list is never changed in place), so on_done need not
        wait. Cut by count and bytes: what is left waits for this batch's ack.
        Called with the lock held."""
        now = time.monotonic()
        if not (self._outcomes and self._ready_to_send(now)):
            return None
        credit = max(0, self._credit_wanted())
        self._requested += credit
        self._seq += 1
        outcomes = next(cut(self._outcomes, outcome_bytes, max_count=GATHER_MAX))
        self._outcomes = self._outcomes[len(outcomes) :]
        self._unacked[self._seq] = outcomes
        self._sent_at[self._seq] = now
        return self._seq, outcomes, credit

    def _check_master_alive(self) -> None:
        """Cancel a stream the master has gone silent on (it answers every heartbeat),
        so the connection thread reconnects. Called with the lock held."""
        silent_s = time.monotonic() - self._last_heard
        if self._stream is not None and silent_s > SILENCE_HEARTBEATS * self._heartbeat_s:
            log.warning("master silent for %.1f s; dropping the connection", silent_s)
            self._stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
            self._stream = None

    def _ready_to_send(self, now: float) -> bool:
        """Whether there is something to send now.

        Outcomes and credit travel together in one Results batch, and only one
        batch is unacknowledged at a time: the next waits for the ack. While
        the pool is still busy, outcomes also gather for up to ``GATHER_S``
        (more are about to come); an idle pool sends at once. So a busy worker
        sends one large batch per round trip, and a lone task is not held back.
        Called with the lock held."""
        if self._unacked:
            return False
        if self._outcomes:
            return (
                now >= self._gather_until
                or len(self._outcomes) >= GATHER_MAX
                or not self._running
                or self.draining.is_set()
            )
        return self._credit_wanted() > 0

    def _credit_wanted(self) -> int:
        if self.draining.is_set():
            return 0
        busy = len(self._running) + len(self._prefetched)
        return self._capacity() - busy - self._requested

    def _capacity(self) -> int:
        """How many tasks to hold: one per slot, plus a prefetch of what the pool gets
        through in one round trip to the master (so a slot never waits on the
        network), at most ``--prefetch``. Long tasks get a prefetch of one: nothing
        waits behind them that another worker could run. Called with the lock held."""
        covering = 1
        if self._job_s and self._round_trip_s:
            # Credit goes out with outcomes, which may gather for GATHER_S first.
            waiting_s = self._round_trip_s + GATHER_S
            covering = math.ceil(self.pool.size * waiting_s / self._job_s)
        return self.pool.size + min(self.config.prefetch, covering)

    @staticmethod
    def _results_message(
        seq: int, outcomes: list[Outcome], credit: int = 0
    ) -> worker_pb2.WorkerMessage:
        message = worker_pb2.WorkerMessage()
        results = message.results
        results.seq = seq
        if credit:
            results.credit = credit
        add = results.outcomes.add
        for outcome in outcomes:
            convert.fill_outcome(add(), outcome)
        return message


def _average(average: float | None, sample: float) -> float:
    """Exponentially weighted moving average; the first sample starts it."""
    return sample if average is None else average + AVERAGE_WEIGHT * (sample - average)


def _requests(
    hello: worker_pb2.WorkerMessage, outbox: queue.SimpleQueue[worker_pb2.WorkerMessage | None]
) -> Iterator[worker_pb2.WorkerMessage]:
    yield hello
    while (message := outbox.get()) is not None:
        yield message


def _outcome(job: Job, result: JobResult) -> Outcome:
    """The outcome to report; for a failed attempt, the master decides on a retry."""
    if result.ok:
        return Outcome(job.ref, TaskState.SUCCEEDED, result=result.result)
    error = result.error or TaskError("Unknown", "no error recorded")
    if result.cancelled:
        return Outcome(job.ref, TaskState.CANCELLED, error=error)
    return Outcome(
        job.ref,
        TaskState.FAILED,
        error=error,
        max_attempts=job.max_attempts,
        no_retry=result.no_retry,
        retry_delay_s=result.retry_delay_s,
    )


def _outcome_label(job: Job, outcome: Outcome) -> str:
    """How ``outcome`` ended, as the metrics name it: a failure with attempts left
    by this attempt's number is "retried" (the master decides, and also gives
    back the attempts of lost leases, so it may retry more)."""
    if outcome.state is TaskState.FAILED and job.attempt < outcome.max_attempts:
        return "retried"
    return outcome.state.name.lower()


def _log_context(job: Job) -> AbstractContextManager[dict[str, str]]:
    """The logging context of lines about ``job``: its task id and attempt."""
    return bound_context(task_id=job.ref.task_id, attempt=str(job.attempt), task=job.name)


def _log_result(job: Job, result: JobResult) -> None:
    """One line on how an attempt ended: failures always, successes at DEBUG."""
    error = result.error or TaskError("Unknown", "no error recorded")
    with _log_context(job):
        if result.ok:
            log.debug("task %s succeeded", job.name)
        elif result.cancelled:
            log.info("task %s stopped: %s", job.name, clipped(error.message))
        elif job.attempt < job.max_attempts:
            log.warning(
                "task %s failed on attempt %d of %d, will retry: %s: %s",
                job.name,
                job.attempt,
                job.max_attempts,
                error.type,
                clipped(error.message),
            )
        else:
            log.warning(
                "task %s failed for good on attempt %d: %s: %s",
                job.name,
                job.attempt,
                error.type,
                clipped(error.message),
            )


def _worth_retrying(exc: BaseException) -> bool:
    """A master that is down or restarting comes back; a wrong token or a Hello the
    master rejects stays wrong however often it is sent."""
    if not isinstance(exc, grpc.RpcError):
        return False
    return not isinstance(from_rpc_error(exc), Unauthenticated | InvalidArgument)


def _rpc_reason(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.RpcError):
        error = from_rpc_error(exc)
        return f"{type(error).__name__}: {error}"
    return repr(exc)
