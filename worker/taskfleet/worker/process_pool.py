"""A pool of spawned processes watched by one supervisor thread.

Not ``multiprocessing.Pool`` (it hangs forever when a child dies) nor
``ProcessPoolExecutor`` (it breaks for good): here a process that dies, runs
past its job's deadline or runs a cancelled job is killed if need be and
replaced, its job is reported failed, and the pool lives on. Processes are
spawned, not forked, because the parent holds gRPC threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from taskfleet.common.errors import ConfigError
from taskfleet.common.model import LeaseRef, TaskError
from taskfleet.worker.execute import Job, JobResult, failed, run_job
from taskfleet.worker.pool import JobLedger, OnDone, Pool, cancelled, timed_out
from taskfleet.worker.registry import import_task_modules

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0
PIPELINE_DEPTH = 2  # jobs a process holds when tasks are short: one running, one next
SHORT_JOB_S = 0.005  # tasks shorter than this on average are pipelined
JOB_S_WEIGHT = 0.1  # weight of the newest job in the moving average of run time

# A child's first message is None once it is ready, or why it could not start;
# then one _WireResult per _WireJob it receives. None asks it to exit. Both travel
# as plain tuples pickled by hand: a slots dataclass pickles through Python-level
# __getstate__/__setstate__, several times dearer than a tuple, on every task.
# A _WireJob is (task_id, lease, name, queue, attempt, payload, content_type,
# timeout_s, metadata); a _WireResult is (ok, result, error) with error None or
# (type, message, traceback). Results come back in job order, so they carry no ref.
_WireJob = tuple[str, int, str, str, int, bytes, str, float, dict[str, str]]
_WireResult = tuple[bool, bytes, tuple[str, str, str] | None]
_PICKLE = pickle.HIGHEST_PROTOCOL
_HEADER = struct.Struct("!i")  # the frame header multiprocessing's Connection uses
_READ_SIZE = 1 << 16


def _frame(message: bytes) -> bytes:
    """``message`` framed as ``Connection.send_bytes`` frames it, so both ends may
    mix the two (the start-up handshake uses the Connection)."""
    return _HEADER.pack(len(message)) + message


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Frames:
    """Frames read from a pipe many at a time: one ``read`` takes whatever has
    arrived, where ``Connection.recv_bytes`` costs two system calls per message."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def read(self) -> list[bytes]:
        """The frames complete after one read (which blocks if nothing has arrived);
        raises EOFError once the other end is gone and every frame is taken."""
        chunk = os.read(self._fd, _READ_SIZE)
        if not chunk:
            raise EOFError
        buffer = self._buffer
        buffer += chunk
        frames = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + _HEADER.size : end]))
            start = end
        del buffer[:start]
        return frames


def _to_wire(job: Job) -> bytes:
    return pickle.dumps(
        (
            job.ref.task_id,
            job.ref.lease,
            job.name,
            job.queue,
            job.attempt,
            job.payload,
            job.content_type,
            job.timeout_s,
            job.metadata,
        ),
        _PICKLE,
    )


def _run_wire(wire: _WireJob) -> bytes:
    task_id, lease, name, queue, attempt, payload, content_type, timeout_s, metadata = wire
    # The time limit counts from now: the job may have waited in the pipe behind another.
    deadline = time.time() + timeout_s if timeout_s else None
    job = Job(
        LeaseRef(task_id, lease), name, queue, attempt, payload, content_type, timeout_s,
        deadline, metadata,
    )  # fmt: skip
    result = run_job(job)
    error = result.error
    return pickle.dumps(
        (
            result.ok,
            result.result,
            None if error is None else (error.type, error.message, error.traceback),
        ),
        _PICKLE,
    )


def _child_main(conn: Connection[object, object], task_modules: Sequence[str]) -> None:
    """A pool process: import the tasks, say ready, run jobs until told to stop."""
    # Shutdown signals are the parent's to handle: it drains, then stops its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import_task_modules(task_modules)
    except Exception as exc:
        conn.send_bytes(pickle.dumps(f"{type(exc).__name__}: {exc}", _PICKLE))
        return
    try:
        conn.send_bytes(pickle.dumps(None, _PICKLE))
        fd = conn.fileno()
        frames = _Frames(fd)
        while True:
            for frame in frames.read():
                wire = pickle.loads(frame)
                if wire is None:
                    return
                # One write per job, as it ends: the parent times the next job from it.
                _write_all(fd, _frame(_run_wire(wire)))
    except (EOFError, OSError):
        pass  # the parent is gone


_STOP = pickle.dumps(None, _PICKLE)


@dataclass(eq=False, slots=True)
class _Child:
    process: SpawnProcess
    conn: Connection[object, object]
    frames: _Frames
    ready: bool = False
    # Jobs sent to the process, in order: the first runs, the rest wait in the pipe.
    jobs: deque[Job] = field(default_factory=deque)
    started_at: float = 0.0  # when the first of ``jobs`` started
    deadline: float | None = None  # when the first of ``jobs`` runs out of time

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
        self._poll_fds: dict[int, tuple[_Child, bool]] = {}  # fd -> (process, is sentinel)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        self._supervisor = threading.Thread(
            target=self._supervise, name="taskfleet-process-pool", daemon=True
        )

    def start(self) -> None:
        self._children = [self._spawn() for _ in range(self.size)]
        try:
            for child in self._children:
                self._await_ready(child)
        except BaseException:
            self.close(wait=False)
            raise
        self._supervisor.start()

    def submit(self, job: Job) -> None:
        self._ledger.add(job.ref)
        self._queued.append(job)
        if threading.get_ident() != self._supervisor.ident:
            # From on_done, on the supervisor itself, the job is dispatched at the
            # top of its next pass anyway: no wake-up (a syscall each way) needed.
            self._wake()

    def free_slots(self) -> int:
        return max(0, self.size * self._depth() - len(self._ledger))

    def _depth(self) -> int:
        """Jobs each process may hold: two when tasks are short (one runs, the next
        waits in its pipe, so the process never idles for a round trip through
        the supervisor), else one, so no job waits behind a long one."""
        return PIPELINE_DEPTH if self._job_s < SHORT_JOB_S else 1

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
        with contextlib.suppress(OSError):  # already awake (buffer full), or closed
            self._wake_w.send(b"\0")

    def _spawn(self) -> _Child:
        parent_end, child_end = self._mp.Pipe()
        process = self._mp.Process(
            target=_child_main,
            args=(child_end, self.task_modules),
            name="taskfleet-pool",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Child(process, parent_end, _Frames(parent_end.fileno()))

    def _await_ready(self, child: _Child) -> None:
        try:
            message = pickle.loads(child.conn.recv_bytes())
        except EOFError:
            child.process.join()
            message = f"it {_death(child.process.exitcode)}"
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
        finally:
            self._stop_children(graceful=not self._ledger.abandoned)

    def _dispatch(self) -> None:
        """Send queued jobs to ready processes, idle ones first; one write per process."""
        depth = self._depth()
        sending: dict[_Child, list[bytes]] = {}
        while self._queued:
            ready = [c for c in self._children if c.ready and len(c.jobs) < depth]
            if not ready:
                break
            child = min(ready, key=lambda c: len(c.jobs))
            job = self._queued.popleft()
            if not self._ledger.wants(job.ref):
                continue  # cancelled while queued; _cancel reports it
            child.jobs.append(job)
            if len(child.jobs) == 1:
                child.start_next()
            sending.setdefault(child, []).append(_frame(_to_wire(job)))
        for child, frames in sending.items():
            with contextlib.suppress(OSError):  # it just died: its sentinel reports the job lost
                _write_all(child.conn.fileno(), b"".join(frames))

    def _wait_and_handle(self) -> None:
        children = tuple(self._children)
        if children != self._polled:
            # A poll set kept while the processes stay the same, not a selector
            # built and filled per pass (multiprocessing's wait does that).
            self._poller = select.poll()
            self._poll_fds = {}
            self._poller.register(self._wake_r.fileno(), select.POLLIN)
            for child in children:
                for fd, died in ((child.conn.fileno(), False), (child.process.sentinel, True)):
                    self._poller.register(fd, select.POLLIN)
                    self._poll_fds[fd] = (child, died)
            self._polled = children
        timeout_s = self._until_next_deadline()
        events = self._poller.poll(None if timeout_s is None else math.ceil(timeout_s * 1000))
        touched: dict[_Child, bool] = {}
        for fd, _ in events:
            handle = self._poll_fds.get(fd)
            if handle is None:
                self._wake_r.recv(4096)
            else:
                child, died = handle
                touched[child] = touched.get(child, False) or died
        for child, died in touched.items():
            self._service(child, died=died)

    def _until_next_deadline(self) -> float | None:
        deadlines = [d for c in self._children if (d := c.deadline) is not None]
        return max(0.0, min(deadlines) - time.time()) if deadlines else None

    def _service(self, child: _Child, *, died: bool) -> None:
        try:
            # Readable: one read takes every result that has arrived. A dead process's
            # last results are all read before its death counts, but never with a
            # read that could block (a process it forked may hold the pipe open).
            while not died or _readable_now(child.conn.fileno()):
                for frame in child.frames.read():
                    self._on_message(child, pickle.loads(frame))
                if not died:
                    break
        except (EOFError, OSError):
            died = True
        if not died:
            return
        child.process.join()
        reason = _death(child.process.exitcode)
        job = self._replace(child)
        if job is not None:
            self._ledger.finish(failed(job.ref, "WorkerLost", f"pool process {reason}"))
        elif not child.ready:
            log.warning("a pool process %s before it was ready; starting another", reason)

    def _on_message(self, child: _Child, message: _WireResult | str | None) -> None:
        if type(message) is tuple:
            job = child.jobs.popleft()
            self._job_s += JOB_S_WEIGHT * (time.time() - child.started_at - self._job_s)
            if child.jobs:
                child.start_next()
            else:
                child.deadline = None
            ok, result, error = message
            self._ledger.finish(
                JobResult(job.ref, ok, result, None if error is None else TaskError(*error))
            )
        elif message is None:
            child.ready = True
        else:
            log.error("a pool process could not start: %s", message)

    def _cancel(self, ref: LeaseRef) -> None:
        for child in self._children:
            if any(job.ref == ref for job in child.jobs):
                # Running or already in its pipe: either way only a kill stops it.
                self._replace(child)
                break
        self._ledger.finish(cancelled(ref))

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for child in list(self._children):
            deadline = child.deadline
            if deadline is not None and deadline <= now:
                job = self._replace(child)
                assert job is not None
                self._ledger.finish(timed_out(job))

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
                    child.conn.send_bytes(_STOP)
            else:
                child.process.kill()
        for child in self._children:
            child.process.join(_STOP_TIMEOUT_S)
            _kill(child)
        self._children = []


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _kill(child: _Child) -> None:
    if child.process.exitcode is None:
        child.process.kill()
    child.process.join()
    child.process.close()
    child.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"died with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"exited with code {exitcode}"
