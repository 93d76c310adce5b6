"""The Celery + Redis side of ``make bench-peers``; runs in .venv-peers' Python.

As a Celery user runs it: Redis as broker and result backend, one Celery worker
with a prefork pool, and the client here (peers.py has the rest).

    .venv-peers/bin/python bench/celery_side.py --w1 20000 --w2 2000 --w3 500
"""

from __future__ import annotations

import time
from typing import Any

import celery
import kombu
from measuring import poll
from peers import RESULT_TIMEOUT_S, PeerCluster, main


class CeleryCluster(PeerCluster):
    """Redis plus one Celery worker with a prefork pool of ``count`` processes."""

    def start_workers(self, count: int) -> None:
        """One worker as the Celery docs start one, waited for until it answers a ping.

        Chosen: the default prefork pool with ``-c 2`` (the default, one process
        per CPU, on this 2-core machine, and as many processes as classic's two
        workers), and gossip, mingle and event heartbeats off, as the docs advise
        for a worker that needs no cluster events: they are broker traffic
        unrelated to running tasks.
        """
        import celery_tasks  # only now: it reads the Redis URL on import

        self.tasks = celery_tasks
        proc = self.start_worker(
            "-m", "celery", "-A", "celery_tasks", "worker",
            "-P", "prefork", "-c", str(count),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING",
        )  # fmt: skip
        control = self.tasks.app.control
        poll(lambda: bool(control.ping(timeout=0.5)), "celery worker", proc=proc)

    def run_batch(self, task: str, args: list[tuple[Any, ...]]) -> float:
        """The plainest way a Celery user runs many tasks and needs all their
        results: delay() in a loop, then AsyncResult.get() on each. On the Redis
        backend get() waits on pub/sub, and results that arrive for other tasks
        meanwhile are kept, so the later get()s mostly return at once. A group
        (apply_async, then GroupResult.get) was tried too and ran about a quarter
        slower here, so it would understate Celery.
        """
        function = getattr(self.tasks, task)
        start = time.perf_counter()
        pending = [function.delay(*a) for a in args]
        values = [result.get(timeout=RESULT_TIMEOUT_S) for result in pending]
        elapsed = time.perf_counter() - start
        assert len(values) == len(args), f"only {len(values)} of {len(args)} results"
        return elapsed

    def round_trip(self, n: int) -> float:
        """One task at a time, the plain way: delay(), then AsyncResult.get()."""
        start = time.perf_counter()
        value = self.tasks.square.delay(n).get(timeout=RESULT_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        assert value == n * n
        return elapsed

    def versions(self) -> dict[str, str]:
        return {"celery": celery.__version__, "kombu": kombu.__version__}


if __name__ == "__main__":
    main(CeleryCluster, __doc__)
