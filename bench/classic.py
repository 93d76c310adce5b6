"""The baseline: the classic multiprocessing.managers master/worker design.

A manager serves a task queue and a result queue on a port with an authkey;
two worker processes connect, get() items, compute, and put() results. This is
the shape of the Python docs' distributed example, measured as is.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from multiprocessing.managers import BaseManager

AUTHKEY = b"bench"


class QueueManager(BaseManager):
    pass


def _serve(port: int, ready: multiprocessing.synchronize.Event) -> None:
    task_queue: queue.Queue[object] = queue.Queue()
    result_queue: queue.Queue[object] = queue.Queue()
    QueueManager.register("get_task_queue", callable=lambda: task_queue)
    QueueManager.register("get_result_queue", callable=lambda: result_queue)
    manager = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    server = manager.get_server()
    ready.set()
    server.serve_forever()


def _work(port: int) -> None:
    QueueManager.register("get_task_queue")
    QueueManager.register("get_result_queue")
    manager = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    manager.connect()
    tasks = manager.get_task_queue()  # type: ignore[attr-defined]
    results = manager.get_result_queue()  # type: ignore[attr-defined]
    while True:
        n = tasks.get()
        if n is None:
            return
        results.put(None if n == "noop" else n * n)


class ClassicCluster:
    """A manager process plus ``workers`` worker processes on one port."""

    def __init__(self, port: int, workers: int = 2) -> None:
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        self._server = ctx.Process(target=_serve, args=(port, ready), daemon=True)
        self._server.start()
        ready.wait(30)
        self._workers = [
            ctx.Process(target=_work, args=(port,), daemon=True) for _ in range(workers)
        ]
        for worker in self._workers:
            worker.start()
        QueueManager.register("get_task_queue")
        QueueManager.register("get_result_queue")
        self._manager = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
        self._manager.connect()
        self.tasks = self._manager.get_task_queue()  # type: ignore[attr-defined]
        self.results = self._manager.get_result_queue()  # type: ignore[attr-defined]

    def run_batch(self, items: list[object]) -> float:
        """Put every item, get every result; returns seconds taken."""
        start = time.perf_counter()
        for item in items:
            self.tasks.put(item)
        for _ in items:
            self.results.get()
        return time.perf_counter() - start

    def round_trip(self, item: object) -> float:
        start = time.perf_counter()
        self.tasks.put(item)
        self.results.get()
        return time.perf_counter() - start

    def processes(self) -> dict[str, list[int]]:
        """Its processes by role, for CPU per task (measuring.cpu_seconds)."""
        return {
            "server": [self._server.pid or 0],
            "workers": [worker.pid or 0 for worker in self._workers],
        }

    def close(self) -> None:
        for _ in self._workers:
            self.tasks.put(None)
        for worker in self._workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        self._server.kill()
        self._server.join()
