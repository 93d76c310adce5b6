"""The memory store's schedules: a dict in creation order, under the store's lock."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from taskfleet.common.model import Schedule, TaskSpec
from taskfleet.master.store.base import FiredTick, new_task_id, schedule_not_found
from taskfleet.master.store.memory_slots import own_spec


class MemorySchedules:
    """The schedule methods of ``MemoryStore``."""

    lock: threading.Lock
    _schedules: dict[str, Schedule]  # in creation order

    def _submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        raise NotImplementedError  # MemoryStore's

    def add_schedule(self, schedule: Schedule) -> Schedule:
        schedule = dataclasses.replace(schedule, id=new_task_id(), spec=own_spec(schedule.spec, ()))
        with self.lock:
            self._schedules[schedule.id] = schedule
        return schedule

    def get_schedule(self, schedule_id: str) -> Schedule:
        with self.lock:
            return self._schedule(schedule_id)

    def list_schedules(self) -> list[Schedule]:
        with self.lock:
            return list(self._schedules.values())

    def delete_schedule(self, schedule_id: str) -> None:
        with self.lock:
            self._schedule(schedule_id)
            del self._schedules[schedule_id]

    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        with self.lock:
            schedule = dataclasses.replace(
                self._schedule(schedule_id), paused=paused, next_fire=next_fire
            )
            self._schedules[schedule_id] = schedule
            return schedule

    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        with self.lock:
            due = [s for s in self._schedules.values() if not s.paused and s.next_fire <= now]
        return sorted(due, key=lambda s: s.next_fire)[:limit]

    def next_schedule_fire(self) -> float | None:
        with self.lock:
            return min(
                (s.next_fire for s in self._schedules.values() if not s.paused), default=None
            )

    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        with self.lock:
            schedule = self._schedules.get(schedule_id)
            if schedule is None or schedule.paused or schedule.next_fire != due:
                return None
            last_fire = schedule.last_fire if fired is None else fired.tick
            self._schedules[schedule_id] = dataclasses.replace(
                schedule, next_fire=next_fire, last_fire=last_fire
            )
            return None if fired is None else self._submit([fired.spec], now)[0]

    def _schedule(self, schedule_id: str) -> Schedule:
        schedule = self._schedules.get(schedule_id)
        if schedule is None:
            raise schedule_not_found(schedule_id)
        return schedule
