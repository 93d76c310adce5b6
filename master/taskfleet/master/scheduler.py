"""Schedules in the master: their RPCs' work, and the timer that fires their ticks.

Every master runs the timer: the store fires each tick in one transaction
that also moves the schedule on, so masters sharing a database never fire a
tick twice. The timer sleeps until the earliest tick, but at most
``MAX_SLEEP_S``, so a schedule another master created is seen within that.
"""

from __future__ import annotations

import asyncio
import logging
import time

from taskfleet.common.errors import StoreUnavailable, StoreUnusable
from taskfleet.common.model import Schedule
from taskfleet.master import schedules
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.loop import LoopBridge

log = logging.getLogger("taskfleet.master.scheduler")

MAX_SLEEP_S = 1.0
# Schedules fired per store read; more due ones are fired by the next round at once.
FIRE_BATCH = 100


class Scheduler:
    """Creates, lists, pauses and deletes schedules, and fires their ticks."""

    def __init__(self, lifecycle: Lifecycle, bridge: LoopBridge) -> None:
        self._lifecycle = lifecycle
        self._store = lifecycle.store
        self._bridge = bridge
        self._changed = asyncio.Event()

    def create(self, schedule: Schedule) -> Schedule:
        """Check ``schedule`` (InvalidArgument naming the field) and store it."""
        checked = schedules.validated(schedule, self._lifecycle.max_payload_bytes, time.time())
        created = self._store.add_schedule(checked)
        self._wake()
        return created

    def list(self) -> list[Schedule]:
        return self._store.list_schedules()

    def delete(self, schedule_id: str) -> None:
        self._store.delete_schedule(schedule_id)

    def pause(self, schedule_id: str) -> Schedule:
        schedule = self._store.get_schedule(schedule_id)
        return self._store.pause_schedule(schedule_id, True, schedule.next_fire)

    def resume(self, schedule_id: str) -> Schedule:
        """Fire again from the first tick after now; one not paused is left alone."""
        schedule = self._store.get_schedule(schedule_id)
        if not schedule.paused:
            return schedule
        next_fire = schedules.first_tick(schedule, time.time())
        resumed = self._store.pause_schedule(schedule_id, False, next_fire)
        self._wake()
        return resumed

    def _wake(self) -> None:
        self._bridge.call(self._changed.set)

    async def run(self) -> None:
        """Fire due ticks until cancelled."""
        while True:
            self._changed.clear()  # before reading: a change from now on is seen
            next_fire = None
            try:
                fired = await self._bridge.workers.run(self._lifecycle.fire_schedules, FIRE_BATCH)
                if fired:
                    log.debug("schedules fired %d tasks", len(fired))
                next_fire = await self._bridge.workers.run(self._store.next_schedule_fire)
            except (StoreUnavailable, StoreUnusable):
                pass  # the store watch says so, once
            except Exception:
                log.exception("cannot fire due schedules; retrying")
            sleep_s = MAX_SLEEP_S
            if next_fire is not None:
                sleep_s = min(MAX_SLEEP_S, max(0.0, next_fire - time.time()))
            try:
                async with asyncio.timeout(sleep_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
