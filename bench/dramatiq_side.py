"""The Dramatiq + Redis side of ``make bench-peers``; runs in .venv-peers' Python.

As a Dramatiq user runs it: Redis as broker and, through the Results
middleware, as result backend; one ``dramatiq`` command with two worker
processes; the client here (peers.py has the rest).

    .venv-peers/bin/python bench/dramatiq_side.py --w1 20000 --w2 2000 --w3 500
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.results import ResultTimeout
from measuring import poll
from peers import RESULT_TIMEOUT_S, PeerCluster, main

RESULT_TIMEOUT_MS = RESULT_TIMEOUT_S * 1000


class DramatiqCluster(PeerCluster):
    """Redis plus ``dramatiq dramatiq_tasks -p COUNT``."""

    def start_workers(self, count: int) -> None:
        """Chosen: ``count`` processes (Dramatiq's default, a process per CPU, is two
        here too) with Dramatiq's default of 8 threads each. With one thread per
        process, as many tasks at once as the other systems' pools run, W1 ran at
        about half the rate and W2 at a fifth, so that would understate it. Waited
        for until a task sent to it comes back."""
        import dramatiq_tasks  # only now: it reads the Redis URL on import

        self.tasks = dramatiq_tasks
        proc = self.start_worker("-m", "dramatiq", "dramatiq_tasks", "--processes", str(count))
        poll(self._answers, "dramatiq workers", proc=proc)

    def _answers(self) -> bool:
        try:
            self.tasks.noop.send().get_result(block=True, timeout=500)
            return True
        except ResultTimeout:
            return False

    def run_batch(self, task: str, args: list[tuple[Any, ...]]) -> float:
        """The plain way: send() in a loop, then get_result(block=True) on each
        message (a BLPOP on its result key, or a GET once it is there)."""
        actor = getattr(self.tasks, task)
        start = time.perf_counter()
        messages = [actor.send(*a) for a in args]
        values = [m.get_result(block=True, timeout=RESULT_TIMEOUT_MS) for m in messages]
        elapsed = time.perf_counter() - start
        assert len(values) == len(args), f"only {len(values)} of {len(args)} results"
        return elapsed

    def round_trip(self, n: int) -> float:
        """One task at a time: send(), then get_result(block=True)."""
        start = time.perf_counter()
        value = self.tasks.square.send(n).get_result(block=True, timeout=RESULT_TIMEOUT_MS)
        elapsed = time.perf_counter() - start
        assert value == n * n
        return elapsed

    def versions(self) -> dict[str, str]:
        return {"dramatiq": dramatiq.__version__}


if __name__ == "__main__":
    main(DramatiqCluster, __doc__)
