"""The master's shared state, wired explicitly: config, store, the event loop
bridge, completion hub, worker sessions, the count of open streams, and the
reaper that returns lapsed leases to their queues."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ResourceExhausted, StoreUnusable
from taskfleet.master.delays import DueTimer
from taskfleet.master.events import CompletionHub
from taskfleet.master.loop import LoopBridge
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Store

log = logging.getLogger("taskfleet.master.leases")


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

    def __post_init__(self) -> None:
        self.bridge = LoopBridge(offload=self.store.blocks)
        self.sessions = Sessions(self.bridge)
        self.due = DueTimer(self.store, self.bridge, self.sessions)

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

    def reap_expired_leases(self) -> int:
        """Return lapsed leases to PENDING and wake workers to take them."""
        expired = self.store.expire(time.time())
        if expired:
            self.metrics.expired(expired)
            log.warning(
                "%d leases lapsed, tasks back to PENDING: %s",
                len(expired),
                ", ".join(f"{t.id} (worker {t.worker_id})" for t in expired[:5]),
            )
            self.sessions.hint_work({t.spec.queue for t in expired})
        return len(expired)

    def run_reaper(self) -> None:
        """Check for lapsed leases several times per lease period until stopping."""
        interval_s = min(1.0, self.config.lease_s / 4)
        while not self.stopping.wait(interval_s):
            try:
                self.reap_expired_leases()
            except StoreUnusable:
                pass  # the store has said so once, and health says NOT_SERVING
            except Exception:
                log.exception("lease reaper failed; retrying")
