"""A process pool's channel to each of its processes, and the loop they run.

The channel is a socket pair carrying frames: a magic, a length, a pickle. The
magic is there because task code runs in the pool process and may write junk
to descriptors it does not own; the parent then sees a frame that does not
start with it (or does not unpickle, or has the wrong shape) and raises
``Malformed``, which costs that process and its job, never the pool. Junk
rarely gets that far: the pool process moves its end of the channel to a high
descriptor, closed on exec, out of reach of loops over the low ones and of the
programs a task starts.

A pool process's first message is None once it is ready, or why it could not
start; then one _WireResult per _WireJob it receives, the jobs coming in lists
(those sent at once share a frame). None asks it to exit.
Both travel as plain tuples pickled by hand: a slots dataclass pickles through
Python-level __getstate__/__setstate__, several times dearer than a tuple, on
every task. A _WireJob is (task_id, lease, name, queue, attempt, payload,
content_type, timeout_s, metadata); a _WireResult is (ok, result, error,
no_retry, retry_delay_s) with error None or (type, message, traceback). Results
come back in job order, so they carry no ref. While a job runs, its
``set_progress`` calls come as (fraction, message) frames, about the job the
parent sent first of those without a result yet.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import resource
import signal
import struct
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

from taskfleet.common.model import LeaseRef
from taskfleet.worker.execute import Job, run_job, safe_str
from taskfleet.worker.registry import import_task_modules
from taskfleet.worker.task_context import set_progress_sink

_WireJob = tuple[str, int, str, str, int, bytes, str, float, dict[str, str]]
WireResult = tuple[bool, bytes, tuple[str, str, str] | None, bool, float]
WireProgress = tuple[float, str]
_PICKLE = pickle.HIGHEST_PROTOCOL
_MAGIC = b"tfP1"
_HEADER = struct.Struct("!4sI")  # magic, length of the pickle that follows
_READ_SIZE = 1 << 16
# The pool process's end of the channel moves to the lowest free descriptor from
# here (or from half the descriptor limit, if that is lower): far above the ones
# a task's "for fd in range(3, 64)" would write to.
_CHANNEL_FD_FLOOR = 1000
STOP = None  # the message that asks a pool process to exit


class Malformed(Exception):
    """A frame on the channel that the other end cannot have written."""


def frame(message: object) -> bytes:
    """``message`` pickled and framed."""
    body = pickle.dumps(message, _PICKLE)
    return _HEADER.pack(_MAGIC, len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Frames:
    """Frames read from the channel many at a time: one ``read`` takes whatever
    has arrived, where ``Connection.recv_bytes`` costs two system calls per message."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def read(self) -> list[bytes]:
        """The pickles of the frames complete after one read (which blocks if nothing
        has arrived); raises EOFError once the other end is gone and every frame
        is taken, Malformed on bytes that do not start a frame."""
        chunk = os.read(self._fd, _READ_SIZE)
        if not chunk:
            raise EOFError
        buffer = self._buffer
        buffer += chunk
        bodies = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            magic, size = _HEADER.unpack_from(buffer, start)
            if magic != _MAGIC:
                raise Malformed(f"a frame starts with {bytes(buffer[start : start + 4])!r}")
            end = start + _HEADER.size + size
            if end > len(buffer):
                break
            bodies.append(bytes(buffer[start + _HEADER.size : end]))
            start = end
        del buffer[:start]
        return bodies


def loads(body: bytes) -> object:
    """A frame's message; Malformed if it does not unpickle."""
    try:
        return pickle.loads(body)
    except Exception as exc:  # junk can make the unpickler raise almost anything
        raise Malformed(f"a frame does not unpickle ({type(exc).__name__})") from None


def check_result(message: object) -> WireResult:
    """``message`` if it has the shape of a _WireResult, else Malformed."""
    if type(message) is tuple and len(message) == 5:
        ok, result, error, no_retry, retry_delay_s = message
        if (
            type(ok) is bool
            and type(result) is bytes
            and type(no_retry) is bool
            and type(retry_delay_s) is float
            and (
                error is None
                or (
                    type(error) is tuple
                    and len(error) == 3
                    and all(type(part) is str for part in error)
                )
            )
        ):
            return message
    raise Malformed(f"a message of type {type(message).__name__} where a result was due")


def is_progress(message: object) -> bool:
    """Whether ``message`` is a progress frame's (a 2-tuple); check_progress checks it."""
    return type(message) is tuple and len(message) == 2


def check_progress(message: object) -> WireProgress:
    """``message`` if it has the shape of a _WireProgress, else Malformed."""
    if type(message) is tuple and len(message) == 2:
        fraction, text = message
        if type(fraction) is float and 0.0 <= fraction <= 1.0 and type(text) is str:
            return fraction, text
    raise Malformed("a progress message that set_progress cannot have sent")


def to_wire(jobs: list[Job]) -> bytes:
    """``jobs`` framed for a pool process: one frame, one pickle for them all (a
    third of the cost of one each)."""
    return frame(
        [
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
            )
            for job in jobs
        ]
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
    try:
        return frame(
            (
                result.ok,
                result.result,
                None if error is None else (error.type, error.message, error.traceback),
                result.no_retry,
                float(result.retry_delay_s),
            )
        )
    except Exception as exc:  # a result past the frame's 4 GiB, say
        why = f"the encoded result does not fit in a message: {safe_str(exc)}"
        return frame((False, b"", ("ResultNotSerializable", why, ""), False, 0.0))


def _hide(conn: Connection[object, object]) -> int:
    """Move the channel to a high descriptor, closed on exec; return it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    floor = (
        _CHANNEL_FD_FLOOR if soft == resource.RLIM_INFINITY else min(_CHANNEL_FD_FLOOR, soft // 2)
    )
    fd = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, max(3, floor))
    conn.close()
    return fd


def child_main(conn: Connection[object, object], task_modules: Sequence[str]) -> None:
    """A pool process: import the tasks, say ready, run jobs until told to stop."""
    # Shutdown signals are the parent's to handle: it drains, then stops its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = _hide(conn)
    try:
        try:
            import_task_modules(task_modules)
        except Exception as exc:
            write_all(fd, frame(f"{type(exc).__name__}: {safe_str(exc)}"))
            return
        write_all(fd, frame(None))
        set_progress_sink(lambda _ref, fraction, message: write_all(fd, frame((fraction, message))))
        frames = Frames(fd)
        while True:
            for body in frames.read():
                wires = pickle.loads(body)
                if wires is STOP:
                    return
                for wire in wires:
                    # One write per job, as it ends: the parent times the next job from it.
                    write_all(fd, _run_wire(wire))
    except (EOFError, OSError):
        pass  # the parent is gone
