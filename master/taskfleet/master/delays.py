"""Wakes workers when a delayed task comes due.

A task submitted with ``not_before``, or sent back with a retry backoff, is
ready at a time rather than at once, and no RPC announces that moment. One
timer on the event loop sleeps until the store's next ready time and then
wakes the workers: one store query per change of that time, instead of one
per idle worker per wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from taskfleet.common.errors import StoreUnavailable
from taskfleet.common.model import Task, TaskSpec
from taskfleet.master.lifecycle import LifecycleListener
from taskfleet.master.loop import LoopBridge
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Store

log = logging.getLogger("taskfleet.master.delays")

RETRY_AFTER_ERROR_S = 1.0


class DueTimer(LifecycleListener):
    """Sleeps until the next delayed task is due, then hints every worker."""

    def __init__(self, store: Store, bridge: LoopBridge, sessions: Sessions) -> None:
        self._store = store
        self._bridge = bridge
        self._sessions = sessions
        self._changed = asyncio.Event()

    def submitted(self, tasks: Sequence[TaskSpec]) -> None:
        now = time.time()
        if any(spec.not_before > now for spec in tasks):
            self.reschedule()

    def retried(self, tasks: Sequence[Task]) -> None:
        self.reschedule()  # the retries wait out a backoff

    def reschedule(self) -> None:
        """A delayed task may now be due sooner: look again. Safe from any thread."""
        self._bridge.call(self._changed.set)

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            self._changed.clear()  # before reading: a change from now on is seen
            now = time.time()
            try:
                ready_at = await self._bridge.workers.run(self._store.next_ready_at, now)
            except StoreUnavailable:  # the store watch says so, once
                ready_at = now + RETRY_AFTER_ERROR_S
            except Exception:
                log.exception("cannot read when the next delayed task is due; retrying")
                ready_at = now + RETRY_AFTER_ERROR_S
            try:
                async with asyncio.timeout(None if ready_at is None else max(0.0, ready_at - now)):
                    await self._changed.wait()
            except TimeoutError:
                self._sessions.work_available(None)
