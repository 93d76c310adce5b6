"""The master's shared state, wired explicitly: config, store, completion hub,
worker sessions, and the reaper that returns lapsed leases to their queues."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import StoreUnusable
from taskfleet.master.events import CompletionHub
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Store

log = logging.getLogger("taskfleet.master.leases")


@dataclass
class MasterRuntime:
    """Everything the servicers share; built once per master process."""

    config: MasterConfig
    store: Store
    hub: CompletionHub = field(default_factory=CompletionHub)
    sessions: Sessions = field(default_factory=Sessions)
    stopping: threading.Event = field(default_factory=threading.Event)
    metrics: MasterMetrics = field(default_factory=MasterMetrics)  # off unless enabled

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
            self.sessions.hint_work()
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
