"""The worker's Prometheus metrics, served at ``--metrics-listen``.

Tasks finish on the pool's reporting thread with the worker's lock already
held, so counting there is a few plain integer increments: no lock and no
Prometheus call per task. The numbers become metric families only when
Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from taskfleet.common.metrics_http import MetricsEndpoint

log = logging.getLogger("taskfleet.worker.metrics")

RUN_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)


class _RunTimes:
    """One task's run-time histogram: a count per bucket (the last is +Inf) and a sum."""

    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(RUN_BUCKETS_S) + 1)
        self.sum_s = 0.0


class WorkerMetrics(MetricsEndpoint, Collector):
    """Counts of one worker. ``task_done`` is called with ``lock`` held; the
    collector takes ``lock`` to read a consistent snapshot."""

    def __init__(self, lock: threading.Condition, busy_slots: Callable[[], int], slots: int):
        self._lock = lock
        self._busy_slots = busy_slots
        self._slots = slots
        self._runs: dict[tuple[str, str], int] = {}
        self._run_times: dict[str, _RunTimes] = {}
        super().__init__(CollectorRegistry())
        self.registry.register(self)

    def task_done(self, name: str, outcome: str, run_s: float) -> None:
        """Count one finished attempt; ``outcome`` is succeeded, failed, retried or
        cancelled. Call with the worker's lock held."""
        key = (name, outcome)
        self._runs[key] = self._runs.get(key, 0) + 1
        times = self._run_times.get(name)
        if times is None:
            times = self._run_times[name] = _RunTimes()
        times.counts[bisect.bisect_left(RUN_BUCKETS_S, run_s)] += 1
        times.sum_s += run_s

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            runs = dict(self._runs)
            run_times = {n: (list(t.counts), t.sum_s) for n, t in self._run_times.items()}
        tasks_run = CounterMetricFamily(
            "taskfleet_worker_tasks_run",
            "Task attempts this worker finished, by task and outcome.",
            labels=["task", "outcome"],
        )
        for (name, outcome), n in sorted(runs.items()):
            tasks_run.add_metric([name, outcome], n)
        yield tasks_run
        seconds = HistogramMetricFamily(
            "taskfleet_worker_task_run_seconds",
            "How long attempts held a pool slot, by task.",
            labels=["task"],
        )
        for name, (counts, sum_s) in sorted(run_times.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, RUN_BUCKETS_S), "+Inf"), counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            seconds.add_metric([name], buckets, sum_s)
        yield seconds
        yield GaugeMetricFamily(
            "taskfleet_worker_busy_slots", "Pool slots running a task.", value=self._busy_slots()
        )
        yield GaugeMetricFamily(
            "taskfleet_worker_slots", "Pool slots of this worker.", value=self._slots
        )
