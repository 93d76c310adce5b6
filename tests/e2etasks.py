"""Tasks the end-to-end tests run on real workers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

from taskfleet.worker import Retry, current_task, task


@task
def square(n: int) -> int:
    return n * n


@task
def context() -> dict[str, Any]:
    """current_task() as seen from inside, plus who ran it; sleeps a little so
    several run at once in one pool."""
    ctx = current_task()
    time.sleep(0.05)
    again = current_task()  # still ours after other tasks ran in between
    assert again.task_id == ctx.task_id
    return {
        "task_id": ctx.task_id,
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "metadata": dict(ctx.metadata),
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@task
async def async_context() -> dict[str, Any]:
    """context() as an ``async def`` task: awaits, then looks at itself."""
    ctx = current_task()
    await asyncio.sleep(0.05)
    return {
        "task_id": current_task().task_id,
        "name": ctx.name,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        "metadata": dict(ctx.metadata),
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@task
async def async_boom(message: str) -> None:
    await asyncio.sleep(0)
    raise RuntimeError(message)


@task
def record(path: str, value: Any) -> Any:
    """Append ``value`` to the file at ``path`` (to see the order tasks ran in)."""
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


@task
def flaky(marker_dir: str, failures: int) -> int:
    """Fail the first ``failures`` attempts, then succeed with the attempt number."""
    attempt = current_task().attempt
    Path(marker_dir, f"attempt-{attempt}").touch()
    if attempt <= failures:
        raise ValueError(f"flaky failure on attempt {attempt}")
    return attempt


@task
def not_seven(n: int) -> int:
    if n == 7:
        raise ValueError("seven")
    return n


@task
def boom(message: str) -> None:
    raise RuntimeError(message)


@task
def block_until(path: str, timeout_s: float = 60.0) -> str:
    """Start, then wait until ``path`` exists; lets tests hold a task RUNNING."""
    Path(f"{path}.started-{current_task().attempt}").write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return "released"


@task(max_attempts=3, retry_on=(ConnectionError,), backoff_s=0.05)
def picky(error: str) -> int:
    """Raise ``error`` (a built-in exception's name) on the first attempt; only a
    ConnectionError is worth another."""
    attempt = current_task().attempt
    if attempt == 1:
        raise {"ConnectionError": ConnectionError, "ValueError": ValueError}[error]("first")
    return attempt


@task(max_attempts=2)
def asks_to_retry(delay_s: float) -> float:
    """Ask for another attempt after ``delay_s``; return when the second started."""
    if current_task().attempt == 1:
        raise Retry(delay_s)
    return time.time()


@task(max_attempts=3)
def fails_by_default_thrice() -> None:
    raise RuntimeError("always")


# -- for the crash, soak and many-hosts tests ------------------------------------


@task
def slow_square(n: int, seconds: float) -> int:
    """``n * n`` after ``seconds``: keeps tasks RUNNING across a fault."""
    time.sleep(seconds)
    return n * n


@task
def square_after_failures(n: int, failures: int) -> int:
    """Fail attempts 1 to ``failures`` with ValueError, then return ``n * n``."""
    attempt = current_task().attempt
    if attempt <= failures:
        raise ValueError(f"injected failure on attempt {attempt}")
    return n * n


@task
def square_crash_first(n: int) -> int:
    """Kill its own pool process on attempt 1 (as the OOM killer would), then ``n * n``.
    Process pools only: in a thread pool it would take the whole worker down."""
    if current_task().attempt == 1:
        os._exit(13)
    return n * n


@task
def square_slow_first(n: int, seconds: float) -> int:
    """Sleep ``seconds`` on attempt 1 (past a shorter time limit), then ``n * n`` at once."""
    if current_task().attempt == 1:
        time.sleep(seconds)
    return n * n


@task
def getpid() -> int:
    """The pid of the process that ran it: a pool process, or the worker itself
    in a thread pool."""
    return os.getpid()


@task
def gated(path: str) -> dict[str, int]:
    """``block_until``, then say which attempt ran, in which process."""
    block_until(path)
    return {"attempt": current_task().attempt, "pid": os.getpid()}


@task(timeout_s=1.0)
def block_under_default_limit(path: str) -> str:
    """``block_until`` with a 1 s time limit that comes from the decorator."""
    return block_until(path)


@task
def exit_with(code: int) -> None:
    """End the process running it at once, skipping every cleanup."""
    os._exit(code)


@task
def blob_after(path: str, n_bytes: int) -> str:
    """``block_until(path)``, then return ``n_bytes`` of "x" (as JSON, two bytes more)."""
    block_until(path)
    return "x" * n_bytes


@task
def length(text: str) -> int:
    return len(text)


@task
def blob(n_bytes: int) -> str:
    return "x" * n_bytes


@task
def progress_steps(gate: str, steps: int) -> str:
    """Set progress ``steps`` times (k/(steps+1), "step k"), wait for ``gate``,
    then set 0.9 and 1.0 "done" at once and return: the last update, held back by
    the coalescing, races the outcome."""
    for k in range(1, steps + 1):
        current_task().set_progress(k / (steps + 1), f"step {k}")
    block_until(gate)
    current_task().set_progress(0.9, "finishing")
    current_task().set_progress(1.0, "done")
    return "finished"


@task
def progress_gated(gates: list[str]) -> str:
    """For each of ``gates``: set progress k/(n+1) "step k", then wait for that gate,
    so a test sees each update reach it before the next is set."""
    for k, gate in enumerate(gates, start=1):
        current_task().set_progress(k / (len(gates) + 1), f"step {k}")
        block_until(gate)
    return "finished"


@task
def bad_progress(fraction: Any) -> str:
    """Set an invalid progress: the ValueError fails the task."""
    current_task().set_progress(fraction)
    return "unreachable"


# A file name that is not UTF-8 comes into Python with a lone surrogate in it.
UNDECODABLE = b"caf\xe9.txt".decode("utf-8", "surrogateescape")


@task
def raises_undecodable() -> None:
    raise OSError(f"cannot read {UNDECODABLE}")


@task
def reports_undecodable() -> int:
    current_task().set_progress(0.5, f"reading {UNDECODABLE}")
    return 1
