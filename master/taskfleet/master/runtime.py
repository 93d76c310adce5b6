"""The master's shared state, wired explicitly: config, store, the event loop
bridge, the lifecycle and its listeners (completion hub, worker sessions, the
due timer, metrics, and the cluster when the store is shared), the watch on
the store, the count of open streams, and the reaper that returns lapsed
leases and prunes expired tasks."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ResourceExhausted, StoreUnavailable, StoreUnusable
from taskfleet.common.model import MasterInfo, QueueCounts, Stats, WorkerInfo
from taskfleet.common.reconnect import RECONNECT_CAP_S
from taskfleet.master.cluster import Cluster, new_master
from taskfleet.master.delays import DueTimer
from taskfleet.master.events import CompletionHub
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.loop import LoopBridge
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.ratelimit import LocalBuckets, RateLimiter
from taskfleet.master.scheduler import Scheduler
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Store
from taskfleet.master.store_watch import StoreWatch

log = logging.getLogger("taskfleet.master.leases")

MAX_PENDING_NAMES = 100


def _merge_workers(local: list[WorkerInfo], remote: list[WorkerInfo]) -> list[WorkerInfo]:
    by_id = {w.worker_id: w for w in sorted(remote, key=lambda w: w.connected_at)}
    by_id.update((w.worker_id, w) for w in local)
    return sorted(by_id.values(), key=lambda w: w.worker_id)


@dataclass
class MasterRuntime:
    """Everything the servicers share; built once per master process, on its loop."""

    config: MasterConfig
    store: Store
    bridge: LoopBridge = field(init=False)
    hub: CompletionHub = field(default_factory=CompletionHub)
    sessions: Sessions = field(init=False)
    due: DueTimer = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)
    metrics: MasterMetrics = field(default_factory=MasterMetrics)  # off unless enabled
    open_streams: int = 0  # changed on the loop only
    lifecycle: Lifecycle = field(init=False)
    me: MasterInfo = field(init=False)
    cluster: Cluster | None = field(init=False)  # None: a store only this master uses
    store_watch: StoreWatch = field(init=False)
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        self.bridge = LoopBridge(self.store.lock)
        # After an outage, workers reconnect within their longest backoff and then
        # renew at once; a whole lease more is the patience they get in any case.
        self.store_watch = StoreWatch(
            self.store, self.bridge, settle_s=self.config.lease_s + RECONNECT_CAP_S
        )
        self.sessions = Sessions(self.bridge)
        self.due = DueTimer(self.store, self.bridge, self.sessions)
        self.me = new_master(self.config.listen)
        bus = self.store.bus()
        self.cluster = (
            None
            if bus is None
            else Cluster(
                bus,
                self.me,
                hub=self.hub,
                sessions=self.sessions,
                due=self.due,
                poll_only=self.config.poll_only,
                forget_after_s=self.config.lease_s,
            )
        )
        listeners = [self.hub, self.sessions, self.due, self.metrics]
        self.lifecycle = Lifecycle(
            self.store,
            max_payload_bytes=self.config.max_payload_bytes,
            listeners=listeners if self.cluster is None else [*listeners, self.cluster],
            limiter=RateLimiter(self.config.rate_limits, bus or LocalBuckets())
            if self.config.rate_limits
            else None,
        )
        self.scheduler = Scheduler(self.lifecycle, self.bridge)

    def stats(self, pending_names: bool = False) -> Stats:
        """GetStats: the store's counts and each queue's oldest ready task, every
        master, and the workers of all of them (a worker that moved between masters
        is listed once, where it is now); with ``pending_names``, the pending tasks
        per queue and name too."""
        local = self.sessions.infos()
        if self.cluster is None:
            masters = [dataclasses.replace(self.me, seen_at=time.time())]
            workers = local
        else:
            masters = self.cluster.masters()
            workers = _merge_workers(local, self.cluster.remote_workers())
        names = self.store.pending_names(MAX_PENDING_NAMES) if pending_names else []
        return Stats(self.queue_stats(), workers, masters, names)

    def queue_stats(self) -> list[QueueCounts]:
        """The store's counts per queue, with when each queue's oldest ready task
        became ready."""
        oldest = self.store.oldest_pending(time.time())
        return [
            dataclasses.replace(q, oldest_pending_at=oldest.get(q.queue, 0.0))
            for q in self.store.stats()
        ]

    def open_stream(self) -> None:
        """Count a new streaming call, or refuse it past ``--max-streams``: a
        stream is cheap, but not free, and unary calls must keep answering."""
        if self.open_streams >= self.config.max_streams:
            raise ResourceExhausted(
                f"too many open streams: this master serves at most {self.config.max_streams} "
                "(WaitTasks and worker streams together, --max-streams)"
            )
        self.open_streams += 1

    def close_stream(self) -> None:
        self.open_streams -= 1

    def run_reaper(self) -> None:
        """Until stopping, several times per lease period: return lapsed leases and
        delete finished tasks whose result TTL ran out (a bounded number per tick).
        No lease lapses while the store is in trouble, nor just after (see StoreWatch)."""
        interval_s = min(1.0, self.config.lease_s / 4)
        while not self.stopping.wait(interval_s):
            try:
                if self.store_watch.leases_may_lapse():
                    self.lifecycle.expire()
                self.lifecycle.prune()
            except (StoreUnusable, StoreUnavailable):
                pass  # the store has said so once, and health says NOT_SERVING
            except Exception:
                log.exception("lease reaper failed; retrying")
