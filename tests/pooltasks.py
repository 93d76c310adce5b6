"""Tasks the pool tests run, in pool processes and pool threads.

Names carry a ``pooltasks.`` prefix so they never collide with other test or
example tasks registered in the same process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from taskfleet.worker import current_task, task

# Set by a thread-pool test before it submits ``together`` jobs.
BARRIER = threading.Barrier(1)
# Thread pool only: ``gate`` jobs say they run, then wait until a test opens GATE.
GATE = threading.Event()
AT_GATE = threading.Semaphore(0)


@task(name="pooltasks.echo")
def echo(value: Any) -> Any:
    return value


@task(name="pooltasks.whoami")
def whoami() -> dict[str, Any]:
    ctx = current_task()
    return {
        "task_id": ctx.task_id,
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "metadata": dict(ctx.metadata),
        "pid": os.getpid(),
    }


@task(name="pooltasks.together")
def together() -> str:
    """Wait until every party runs at once, then say who we are."""
    BARRIER.wait(timeout=10)
    return current_task().task_id


@task(name="pooltasks.nap")
def nap(seconds: float, marker: str = "") -> float:
    _mark(marker)
    time.sleep(seconds)
    return seconds


@task(name="pooltasks.gate")
def gate() -> str:
    AT_GATE.release()
    GATE.wait(timeout=30)
    return "through"


@task(name="pooltasks.explode")
def explode(message: str) -> None:
    raise ValueError(message)


@task(name="pooltasks.quit")
def quit_() -> None:
    sys.exit(7)


@task(name="pooltasks.exit_hard")
def exit_hard(code: int) -> None:
    os._exit(code)


@task(name="pooltasks.kill_self")
def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@task(name="pooltasks.hang")
def hang(marker: str = "") -> None:
    _mark(marker)
    time.sleep(3600)


@task(name="pooltasks.a_set")
def a_set() -> set[int]:
    return {1, 2}


def _mark(marker: str) -> None:
    """Leave our pid in ``marker`` (atomically) so a test knows the task runs."""
    if marker:
        partial = Path(f"{marker}.partial")
        partial.write_text(str(os.getpid()))
        partial.replace(marker)


# -- tasks that attack the pool's own code ----------------------------------------


@task(name="pooltasks.fork")
def fork(child_raises: bool = False) -> dict[str, Any]:
    """Fork; the child leaves the task as the parent does (returns or raises) and
    the parent reports how the child ended (None: still running after 10 s)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process with threads (a thread pool's).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        if child_raises:
            raise RuntimeError("raised in the forked child")
        return {"who": "child"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"who": "parent", "child_exit": os.waitstatus_to_exitcode(status)}
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return {"who": "parent", "child_exit": None}


@task(name="pooltasks.scribble")
def scribble(highest_fd: int) -> str:
    """Write junk to every descriptor from 3 to ``highest_fd`` that takes it."""
    for fd in range(3, highest_fd + 1):
        with contextlib.suppress(OSError):
            os.write(fd, b"junk")
    return "scribbled"


@task(name="pooltasks.nested")
def nested(depth: int) -> list[Any]:
    """A return value nested too deeply for the JSON encoder."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class _ItemsFail(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise LookupError("items() refused")


@task(name="pooltasks.unencodable")
def unencodable() -> dict[str, int]:
    """A return value whose encoding raises something other than TypeError."""
    return _ItemsFail(a=1)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ refused")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ refused")


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@task(name="pooltasks.raise_unprintable")
def raise_unprintable() -> None:
    raise UnprintableError()


@task(name="pooltasks.raise_unpicklable")
def raise_unpicklable() -> None:
    raise UnpicklableError("holds a lock")


@task(name="pooltasks.close_all_and_hang")
def close_all_and_hang(highest_fd: int) -> None:
    """Close every descriptor from 3 to ``highest_fd``, then never return."""
    os.closerange(3, highest_fd + 1)
    time.sleep(3600)
