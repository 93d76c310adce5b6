"""The master's shared state, wired explicitly: config, store, the event loop
bridge, the lifecycle and its listeners (completion hub, worker sessions, the
due timer, metrics), the watch on the store, the count of open streams, and
the reaper that returns lapsed leases and prunes expired tasks."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ResourceExhausted, StoreUnavailable, StoreUnusable
from taskfleet.common.reconnect import RECONNECT_CAP_S
from taskfleet.master.delays import DueTimer
from taskfleet.master.events import CompletionHub
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.loop import LoopBridge
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Store
from taskfleet.master.store_watch import StoreWatch

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
    lifecycle: Lifecycle = field(init=False)
    store_watch: StoreWatch = field(init=False)

    def __post_init__(self) -> None:
        self.bridge = LoopBridge(offload=self.store.blocks)
        # After an outage, workers reconnect within their longest backoff and then
        # renew at once; a whole lease more is the patience they get in any case.
        self.store_watch = StoreWatch(
            self.store, self.bridge, settle_s=self.config.lease_s + RECONNECT_CAP_S
        )
        self.sessions = Sessions(self.bridge)
        self.due = DueTimer(self.store, self.bridge, self.sessions)
        self.lifecycle = Lifecycle(
            self.store,
            max_payload_bytes=self.config.max_payload_bytes,
            listeners=[self.hub, self.sessions, self.due, self.metrics],
        )

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
