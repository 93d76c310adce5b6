"""A tasks module that breaks the worker's pool from inside, for the test that a
worker with a broken pool exits rather than holding its tasks' leases.

Imported by the worker (and its pool processes), it makes the pool's own code
raise when it handles a ``break_pool`` job: the process pool's supervisor as it
sends the job to a pool process, a thread pool's thread as it starts the job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from taskfleet.worker import process_pool, task, thread_pool
from taskfleet.worker.execute import Job


@task
def break_pool() -> None:
    """Never runs: the pool breaks on the way to it."""


def _raising_on_break_pool(
    original: Callable[..., Any], jobs_of: Callable[[Any], list[Job]]
) -> Callable[..., Any]:
    def sabotaged(jobs: Any, *args: Any) -> Any:
        if any(job.name == "break_pool" for job in jobs_of(jobs)):
            raise RuntimeError("sabotaged by poolsaboteur")
        return original(jobs, *args)

    return sabotaged


process_pool.to_wire = _raising_on_break_pool(process_pool.to_wire, list)  # type: ignore[attr-defined]
thread_pool.run_job = _raising_on_break_pool(thread_pool.run_job, lambda job: [job])  # type: ignore[attr-defined]
