"""The SQLite store's schedules: a table of their own, and the tick that fires
one, which moves it on and submits its task in one transaction."""

from __future__ import annotations

import dataclasses
import sqlite3
from contextlib import AbstractContextManager

from taskfleet.common.model import Schedule
from taskfleet.master.store.base import FiredTick, new_task_id, schedule_not_found
from taskfleet.master.store.rows import PENDING, SCHEDULE_COLUMNS, schedule_from_row, schedule_row
from taskfleet.master.store.sqlite_sql import INSERT, Counts, task_row

INSERT_SCHEDULE = (
    f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?"


class SqliteSchedules:
    """The schedule methods of ``SqliteStore``, on its connection."""

    _counts: Counts  # SqliteStore's

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # SqliteStore's

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # SqliteStore's

    def add_schedule(self, schedule: Schedule) -> Schedule:
        schedule = dataclasses.replace(schedule, id=new_task_id())
        with self._write() as db:
            db.execute(INSERT_SCHEDULE, schedule_row(schedule))
        return schedule

    def get_schedule(self, schedule_id: str) -> Schedule:
        with self._read() as db:
            row = db.execute(SELECT_SCHEDULE, (schedule_id,)).fetchone()
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def list_schedules(self) -> list[Schedule]:
        with self._read() as db:
            rows = db.execute(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY seq").fetchall()
        return [schedule_from_row(row) for row in rows]

    def delete_schedule(self, schedule_id: str) -> None:
        with self._write() as db:
            if not db.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,)).rowcount:
                raise schedule_not_found(schedule_id)

    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        with self._write() as db:
            db.execute(
                "UPDATE schedules SET paused = ?, next_fire = ? WHERE id = ?",
                (paused, next_fire, schedule_id),
            )
            row = db.execute(SELECT_SCHEDULE, (schedule_id,)).fetchone()
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire <= ?"
                " ORDER BY next_fire LIMIT ?",
                (now, limit),
            ).fetchall()
        return [schedule_from_row(row) for row in rows]

    def next_schedule_fire(self) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT min(next_fire) FROM schedules WHERE NOT paused").fetchone()
        return None if row[0] is None else float(row[0])

    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        tick = None if fired is None else fired.tick
        with self._write() as db:
            claimed = db.execute(
                "UPDATE schedules SET next_fire = ?, last_fire = coalesce(?, last_fire)"
                " WHERE id = ? AND next_fire = ? AND NOT paused",
                (next_fire, tick, schedule_id, due),
            ).rowcount
            if not claimed or fired is None:
                return None
            task_id = new_task_id()
            db.execute(INSERT, task_row(task_id, fired.spec, now))
            self._counts.add(fired.spec.queue, PENDING)
            return task_id
