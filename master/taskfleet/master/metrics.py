"""The master's Prometheus metrics: one registry per process, served at
``--metrics-listen`` and off (every call a no-op) without it.

Hot paths count once per batch, not once per task: callers hand over whole
lists of tasks and each distinct (queue, task) pair costs one increment.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskfleet.common.errors import StoreUnavailable, StoreUnusable
from taskfleet.common.metrics_http import MetricsEndpoint
from taskfleet.common.model import QueueCounts, Task, TaskSpec, TaskState, WorkerInfo
from taskfleet.master.lifecycle import LifecycleListener

log = logging.getLogger("taskfleet.master.metrics")

_FINAL_STATES = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
}
# Unary calls take milliseconds; streams (Connect, WaitTasks) last up to hours.
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600)


class MasterMetrics(MetricsEndpoint, LifecycleListener):
    """Counters, histograms and the queue-depth collector of one master."""

    def __init__(self, enabled: bool = False) -> None:
        super().__init__(CollectorRegistry())
        self.enabled = enabled
        labels = ["queue", "task"]
        r = self.registry
        self._submitted = Counter(
            "taskfleet_tasks_submitted", "Tasks accepted by Submit.", labels, registry=r
        )
        self._finished = {
            state: Counter(
                f"taskfleet_tasks_{name}", f"Tasks that ended {state.name}.", labels, registry=r
            )
            for state, name in _FINAL_STATES.items()
        }
        self._retried = Counter(
            "taskfleet_tasks_retried",
            "Failed attempts sent back to PENDING for another try.",
            labels,
            registry=r,
        )
        self._lost = Counter(
            "taskfleet_lost_leases",
            "Leases that lapsed without a heartbeat (their tasks went back to PENDING, "
            "or ended FAILED WorkerLost past --max-lost-leases).",
            labels,
            registry=r,
        )
        self._pruned = Counter(
            "taskfleet_tasks_pruned",
            "Finished tasks deleted when their result TTL ran out, or by PurgeTasks.",
            registry=r,
        )
        self._rpc_seconds = Histogram(
            "taskfleet_rpc_duration_seconds",
            "Time spent serving each RPC (a stream: its whole life), by method and status code.",
            ["method", "code"],
            buckets=RPC_BUCKETS_S,
            registry=r,
        )

    def watch(
        self, queue_counts: Callable[[], list[QueueCounts]], workers: Callable[[], list[WorkerInfo]]
    ) -> None:
        """Report queue depth and connected workers, read on every scrape."""
        if self.enabled:
            self.registry.register(_StateCollector(queue_counts, workers))

    # -- counting ------------------------------------------------------------

    def submitted(self, specs: Sequence[TaskSpec]) -> None:
        if self.enabled:
            _add(self._submitted, Tally((s.queue, s.name) for s in specs))

    def finished(self, tasks: Sequence[Task]) -> None:
        """Count tasks that reached a final state (each exactly once: stores report
        a task's final state only to the call that wrote it)."""
        if not self.enabled:
            return
        tally = Tally((t.state, t.spec.queue, t.spec.name) for t in tasks)
        for (state, queue, name), n in tally.items():
            counter = self._finished.get(state)
            if counter is not None:
                counter.labels(queue, name).inc(n)

    def retried(self, tasks: Sequence[Task]) -> None:
        if self.enabled:
            _add(self._retried, Tally((t.spec.queue, t.spec.name) for t in tasks))

    def lost(self, tasks: Sequence[Task]) -> None:
        if self.enabled:
            _add(self._lost, Tally((t.spec.queue, t.spec.name) for t in tasks))

    def pruned(self, count: int) -> None:
        if self.enabled:
            self._pruned.inc(count)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        if self.enabled:
            self._rpc_seconds.labels(method, code).observe(seconds)


def _add(counter: Counter, tally: Tally[tuple[str, str]]) -> None:
    for (queue, name), n in tally.items():
        counter.labels(queue, name).inc(n)


class _StateCollector(Collector):
    """Gauges computed from the store and the sessions when Prometheus scrapes."""

    def __init__(
        self, queue_counts: Callable[[], list[QueueCounts]], workers: Callable[[], list[WorkerInfo]]
    ) -> None:
        self._queue_counts = queue_counts
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "taskfleet_queue_depth", "Tasks per queue and state.", labels=["queue", "state"]
        )
        try:
            queue_counts = self._queue_counts()
        except (StoreUnusable, StoreUnavailable):
            queue_counts = []  # the store has said so once; the other gauges still count
        oldest = GaugeMetricFamily(
            "taskfleet_queue_oldest_pending_age_seconds",
            "How long each queue's oldest ready PENDING task has waited (queues with one).",
            labels=["queue"],
        )
        now = time.time()
        for counts in queue_counts:
            for state in TaskState:
                depth.add_metric([counts.queue, state.name.lower()], counts.counts.get(state, 0))
            if counts.oldest_pending_at:
                oldest.add_metric([counts.queue], max(0.0, now - counts.oldest_pending_at))
        yield depth
        yield oldest
        infos = self._workers()
        yield GaugeMetricFamily(
            "taskfleet_workers_connected", "Workers with an open stream.", value=len(infos)
        )
        yield GaugeMetricFamily(
            "taskfleet_workers_slots",
            "Pool slots of the connected workers.",
            value=sum(i.concurrency for i in infos),
        )
