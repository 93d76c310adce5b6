"""Tasks the pool tests run, in pool processes and pool threads.

Names carry a ``pooltasks.`` prefix so they never collide with other test or
example tasks registered in the same process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
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
