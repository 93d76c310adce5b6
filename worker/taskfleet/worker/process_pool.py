"""A pool of spawned processes watched by one supervisor thread.

Not ``multiprocessing.Pool`` (it hangs forever when a child dies) nor
``ProcessPoolExecutor`` (it breaks for good): here a process that dies, runs
past its job's deadline or runs a cancelled job is killed if need be and
replaced, its job is reported failed, and the pool lives on. So is a process
that writes junk on its channel or closes it without exiting (task code that
scribbles on descriptors it does not own). Processes are spawned, not forked,
because the parent holds gRPC threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from taskfleet.common.errors import ConfigError
from taskfleet.common.model import LeaseRef, TaskError
from taskfleet.worker.execute import Job, JobResult, failed
from taskfleet.worker.pool import JobLedger, OnDone, Pool, cancelled, timed_out
from taskfleet.worker.process_child import (
    STOP,
    Frames,
    Malformed,
    check_progress,
    check_result,
    child_main,
    frame,
    is_progress,
    loads,
    to_wire,
    write_all,
)
from taskfleet.worker.task_context import report_progress

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0
# How long a process that closed its channel may take to exit before it is killed:
# a dying process closes its descriptors a moment before it counts as exited.
_HANGUP_GRACE_S = 2.0
SHORT_JOB_S = 0.005  # tasks shorter than this on average are pipelined
PIPELINE_AHEAD_S = 0.001  # about this much work may wait in a process's pipe
MAX_PIPELINE_DEPTH = 8  # and at most this many jobs in all
JOB_S_WEIGHT = 0.1  # weight of the newest job in the moving average of run time


@dataclass(eq=False, slots=True)
class _Child:
    process: SpawnProcess
    conn: Connection[object, object]
    frames: Frames
    exit_fd: int  # readable once the process has exited: see _exit_fd
    ready: bool = False
    # Jobs sent to the process, in order: the first runs, the rest wait in the pipe.
    jobs: deque[Job] = field(default_factory=deque)
    started_at: float = 0.0  # when the first of ``jobs`` started
    deadline: float | None = None  # when the first of ``jobs`` runs out of time
    hangup_deadline: float | None = None  # closed its channel: killed if alive by then

    def start_next(self) -> None:
        """Note that the first job starts now: its time limit counts from here."""
        self.started_at = now = time.time()
        timeout_s = self.jobs[0].timeout_s
        self.deadline = now + timeout_s if timeout_s else None


class ProcessPool(Pool):
    """Runs each job in one of ``size`` processes; for CPU-bound tasks.

    Kills are real: a time limit, a cancel or a crash costs the process, which
    is replaced (a spawn plus the task modules' import) while other jobs run on.
    Pool processes are daemonic, so a task cannot start processes of its own;
    and a process whose parent is killed outright lives until its job returns.
    """

    def __init__(self, size: int, task_modules: Sequence[str], on_done: OnDone) -> None:
        super().__init__(size, task_modules, on_done)
        self._mp = multiprocessing.get_context("spawn")
        self._ledger = JobLedger(on_done)
        self._queued: deque[Job] = deque()  # submitted, waiting for a ready process
        self._children: list[_Child] = []  # the supervisor's alone once started
        self._job_s = SHORT_JOB_S * 10  # moving average of run time; no pipelining at first
        self._polled: tuple[_Child, ...] | None = None  # the processes _poller watches
        self._poller = select.poll()
        self._poll_fds: dict[int, tuple[_Child, bool]] = {}  # fd -> (process, is exit_fd)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        # A wake-up byte is on its way: the jobs of one Assignments message then
        # cost one system call, not one each. Cleared only after the bytes are
        # read (clearing first would let that read swallow a byte sent just
        # after, leaving the flag set and the supervisor asleep); a change made
        # before the clear is seen by the dispatch that follows it.
        self._wake_pending = False
        self._supervisor = self._thread(self._supervise, "taskfleet-process-pool")

    def start(self) -> None:
        self._children = [self._spawn() for _ in range(self.size)]
        try:
            for child in self._children:
                self._await_ready(child)
        except BaseException:
            self.close(wait=False)
            raise
        self._supervisor.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        self._ledger.add(jobs)
        self._queued.extend(jobs)
        if threading.get_ident() != self._supervisor.ident:
            # From on_done, on the supervisor itself, the job is dispatched at the
            # top of its next pass anyway: no wake-up (a syscall each way) needed.
            self._wake()

    def free_slots(self) -> int:
        return max(0, self.size * self._depth() - len(self._ledger))

    def _depth(self) -> int:
        """Jobs each process may hold. Short tasks are pipelined: the next ones wait
        in the process's pipe, so it never idles for a round trip through the
        supervisor, which in turn reads several results per wake-up. As many as
        make about PIPELINE_AHEAD_S of work, and at least two, so a job waits
        behind little; tasks of SHORT_JOB_S or more on average get one, so no job
        waits behind a long one."""
        if self._job_s >= SHORT_JOB_S:
            return 1
        ahead = int(PIPELINE_AHEAD_S / max(self._job_s, 1e-6))
        return max(2, min(MAX_PIPELINE_DEPTH, 1 + ahead))

    def cancel(self, ref: LeaseRef) -> bool:
        if not self._ledger.cancel(ref):
            return False
        self._wake()
        return True

    def close(self, wait: bool = True) -> None:
        self._ledger.close(abandon=not wait)
        self._wake()
        if self._supervisor.is_alive():
            self._supervisor.join()
        else:
            self._stop_children(graceful=False)  # never started, or start failed
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(OSError):  # already awake (buffer full), or closed
            self._wake_w.send(b"\0")

    def _spawn(self) -> _Child:
        parent_end, child_end = self._mp.Pipe()
        process = self._mp.Process(
            target=child_main,
            args=(child_end, self.task_modules),
            name="taskfleet-pool",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Child(process, parent_end, Frames(parent_end.fileno()), _exit_fd(process))

    def _await_ready(self, child: _Child) -> None:
        message: object
        try:
            while not (bodies := child.frames.read()):
                pass
            message = loads(bodies[0])
        except (EOFError, OSError):
            child.process.join()
            message = f"it {_death(child.process.exitcode)}"
        except Malformed as exc:
            message = f"it sent a malformed message ({exc})"
        if message is not None:
            raise ConfigError(f"--tasks: a pool process could not start: {message}")
        child.ready = True

    def _supervise(self) -> None:
        try:
            while not self._ledger.abandoned and not (
                self._ledger.closed and not len(self._ledger)
            ):
                for ref in self._ledger.cancelling():
                    self._cancel(ref)
                self._dispatch()
                self._wait_and_handle()
                self._enforce_deadlines()
        except BaseException:
            self._stop_children(graceful=False)  # broken: its jobs will never be reported
            raise
        self._stop_children(graceful=not self._ledger.abandoned)

    def _dispatch(self) -> None:
        """Send queued jobs to ready processes, the least busy first; one write per
        process."""
        if not self._queued:
            return
        depth = self._depth()
        ready = [c for c in self._children if c.ready and len(c.jobs) < depth]
        sending: dict[_Child, list[Job]] = {}
        while ready and self._queued:
            room = sum(depth - len(c.jobs) for c in ready)
            taken = [self._queued.popleft() for _ in range(min(room, len(self._queued)))]
            # Those cancelled while queued are dropped here; _cancel reports them.
            for job in self._ledger.wanted(taken):
                child = min(ready, key=_load)
                child.jobs.append(job)
                if len(child.jobs) == 1:
                    child.start_next()
                if len(child.jobs) == depth:
                    ready.remove(child)
                sending.setdefault(child, []).append(job)
        for child, jobs in sending.items():
            with contextlib.suppress(OSError):  # it just died: its exit reports the job lost
                write_all(child.conn.fileno(), to_wire(jobs))

    def _wait_and_handle(self) -> None:
        children = tuple(self._children)
        if children != self._polled:
            # A poll set kept while the processes stay the same, not a selector
            # built and filled per pass (multiprocessing's wait does that).
            self._poller = select.poll()
            self._poll_fds = {}
            self._poller.register(self._wake_r.fileno(), select.POLLIN)
            for child in children:
                watched = [(child.exit_fd, True), (child.conn.fileno(), False)]
                if child.hangup_deadline is not None:
                    # It closed the channel; only a pidfd still has news (its exit).
                    watched = [] if child.exit_fd == child.process.sentinel else watched[:1]
                for fd, exited in watched:
                    self._poller.register(fd, select.POLLIN)
                    self._poll_fds[fd] = (child, exited)
            self._polled = children
        timeout_s = self._until_next_deadline()
        events = self._poller.poll(None if timeout_s is None else math.ceil(timeout_s * 1000))
        touched: dict[_Child, bool] = {}
        done: list[JobResult] = []  # reported together: one on_done a wake-up
        for fd, _ in events:
            handle = self._poll_fds.get(fd)
            if handle is None:
                self._wake_r.recv(4096)
                self._wake_pending = False
            else:
                child, exited = handle
                touched[child] = touched.get(child, False) or exited
        for child, exited in touched.items():
            if child in self._children:  # not replaced while servicing another
                self._service(child, done, exited=exited)
        if done:
            self._ledger.finish(done)

    def _until_next_deadline(self) -> float | None:
        deadlines = [d for c in self._children for d in (c.deadline, c.hangup_deadline) if d]
        return max(0.0, min(deadlines) - time.time()) if deadlines else None

    def _service(self, child: _Child, done: list[JobResult], *, exited: bool) -> None:
        """Read what ``child`` sent; its results go on ``done``."""
        try:
            # Readable: one read takes every result that has arrived. An exited process's
            # last results are all read before its exit counts, but never with a read
            # that could block (a process it started may hold the channel open).
            while not exited or _readable_now(child.conn.fileno()):
                for body in child.frames.read():
                    self._on_message(child, loads(body), done)
                if not exited:
                    return
        except (EOFError, OSError):
            pass  # it closed the channel: exiting, or its task closed what it does not own
        except Malformed as exc:
            self._lose(
                child,
                f"sent a malformed message ({exc}), so it was killed: "
                "did the task write to file descriptors it does not own?",
            )
            return
        exitcode = child.process.exitcode
        if exitcode is not None:
            self._lose(child, _death(exitcode))
        elif child.hangup_deadline is None:
            # Not exited yet (or an exit_fd that can be fooled): wait for the exit,
            # a little, hearing no more from it.
            child.hangup_deadline = time.time() + _HANGUP_GRACE_S
            child.ready = False
            self._polled = None

    def _on_message(self, child: _Child, message: object, done: list[JobResult]) -> None:
        if message is None:
            child.ready = True
        elif type(message) is str:
            log.error("a pool process could not start: %s", message)
        elif not child.jobs:
            raise Malformed("a result with no job running")
        elif is_progress(message):
            fraction, text = check_progress(message)
            report_progress(child.jobs[0].ref, fraction, text)
        else:
            ok, result, error, no_retry, retry_delay_s = check_result(message)
            job = child.jobs.popleft()
            self._job_s += JOB_S_WEIGHT * (time.time() - child.started_at - self._job_s)
            if child.jobs:
                child.start_next()
            else:
                child.deadline = None
            done.append(
                JobResult(
                    job.ref,
                    ok,
                    result,
                    None if error is None else TaskError(*error),
                    no_retry=no_retry,
                    retry_delay_s=retry_delay_s,
                )
            )

    def _lose(self, child: _Child, reason: str) -> None:
        """Replace ``child``, killing it if need be; its job fails naming ``reason``."""
        job = self._replace(child)
        if job is not None:
            self._ledger.finish([failed(job.ref, "WorkerLost", f"pool process {reason}")])
        else:
            log.warning("a pool process with no job %s; starting another", reason)

    def _cancel(self, ref: LeaseRef) -> None:
        for child in self._children:
            if any(job.ref == ref for job in child.jobs):
                # Running or already in its pipe: either way only a kill stops it.
                self._replace(child)
                break
        self._ledger.finish([cancelled(ref)])

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for child in list(self._children):
            deadline = child.deadline
            if child.hangup_deadline is not None and child.hangup_deadline <= now:
                exitcode = child.process.exitcode
                self._lose(
                    child,
                    _death(exitcode)
                    if exitcode is not None
                    else "closed its channel to the pool without exiting, so it was killed: "
                    "did the task close file descriptors it does not own?",
                )
            elif deadline is not None and deadline <= now:
                job = self._replace(child)
                assert job is not None
                self._ledger.finish([timed_out(job)])

    def _replace(self, child: _Child) -> Job | None:
        """Kill ``child`` if it still runs, start another in its place; return the job
        it was running. Jobs waiting in its pipe go back to the front of the queue."""
        _kill(child)
        self._children[self._children.index(child)] = self._spawn()
        running = child.jobs.popleft() if child.jobs else None
        self._queued.extendleft(reversed(child.jobs))
        return running

    def _stop_children(self, *, graceful: bool) -> None:
        for child in self._children:
            if graceful and child.ready:
                with contextlib.suppress(OSError):
                    write_all(child.conn.fileno(), frame(STOP))
            else:
                child.process.kill()
        for child in self._children:
            child.process.join(_STOP_TIMEOUT_S)
            _kill(child)
        self._children = []


def _load(child: _Child) -> int:
    return len(child.jobs)


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _exit_fd(process: SpawnProcess) -> int:
    """A descriptor readable once ``process`` has exited: a pidfd where the system
    has them. The fallback, the process's sentinel, a task can make readable by
    writing junk to it or closing it (_service then waits a little for the exit,
    and kills), or hold open in a process of its own, hiding the exit."""
    assert process.pid is not None  # started
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.sentinel


def _kill(child: _Child) -> None:
    if child.process.exitcode is None:
        child.process.kill()
    child.process.join()
    if child.exit_fd != child.process.sentinel:
        os.close(child.exit_fd)
    child.process.close()
    child.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"died with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"exited with code {exitcode}"
