"""The RQ + Redis side of ``make bench-peers``; runs in .venv-peers' Python.

As an RQ user runs it: Redis (RQ's only broker and result store), two ``rq
worker`` processes with RQ's default worker, which forks a work horse per job,
and the client here (peers.py has the rest).

    .venv-peers/bin/python bench/rq_side.py --w1 20000 --w2 2000 --w3 500
"""

from __future__ import annotations

import time
from typing import Any

import rq
import rq_tasks
from measuring import poll
from peers import RESULT_TIMEOUT_S, PeerCluster, main
from redis import Redis
from rq.job import Job
from rq.results import Result


class RqCluster(PeerCluster):
    """Redis plus ``count`` ``rq worker`` processes on the default queue."""

    def start_workers(self, count: int) -> None:
        """Each worker as RQ's docs start one, logging warnings only (as the Celery
        worker does), waited for until all have registered."""
        self.connection = Redis.from_url(self.redis_url)
        self.queue = rq.Queue(connection=self.connection)
        procs = [
            self.start_worker(
                "-m", "rq.cli", "worker", "--url", self.redis_url, "--logging_level", "WARNING"
            )
            for _ in range(count)
        ]
        poll(
            lambda: len(rq.Worker.all(connection=self.connection)) == count,
            "rq workers",
            proc=procs[0],
        )

    def run_batch(self, task: str, args: list[tuple[Any, ...]]) -> float:
        """The plain way: enqueue() in a loop, then latest_result(timeout=...) on
        each job (an XREAD on its result stream, blocking until it is there)."""
        function = getattr(rq_tasks, task)
        start = time.perf_counter()
        jobs = [self.queue.enqueue(function, *a) for a in args]
        done = sum(_succeeded(job) for job in jobs)
        elapsed = time.perf_counter() - start
        assert done == len(args), f"only {done} of {len(args)} succeeded"
        return elapsed

    def round_trip(self, n: int) -> float:
        """One job at a time: enqueue(), then latest_result(timeout=...)."""
        start = time.perf_counter()
        result = self.queue.enqueue(rq_tasks.square, n).latest_result(timeout=RESULT_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        assert result is not None and result.return_value == n * n
        return elapsed

    def versions(self) -> dict[str, str]:
        return {"rq": rq.__version__}

    def close(self) -> None:
        if hasattr(self, "connection"):
            self.connection.close()
        super().close()


def _succeeded(job: Job) -> bool:
    result = job.latest_result(timeout=RESULT_TIMEOUT_S)
    return result is not None and result.type == Result.Type.SUCCESSFUL


if __name__ == "__main__":
    main(RqCluster, __doc__)
