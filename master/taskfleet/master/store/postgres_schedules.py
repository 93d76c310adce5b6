"""The PostgreSQL store's schedules: a table of their own, and the tick that
fires one, which claims it against other masters and submits its task at once."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from taskfleet.common.model import Schedule
from taskfleet.master.store.base import FiredTick, new_task_id, schedule_not_found
from taskfleet.master.store.postgres_pool import PostgresConnections
from taskfleet.master.store.postgres_sql import INSERT, task_row
from taskfleet.master.store.rows import (
    PENDING,
    SCHEDULE_COLUMNS,
    schedule_from_row,
    schedule_row,
)

INSERT_SCHEDULE = f"""INSERT INTO schedules ({SCHEDULE_COLUMNS})
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
SELECT_SCHEDULE = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = %s"


class PostgresSchedules(PostgresConnections):
    """The schedule methods of ``PostgresStore``."""

    def add_schedule(self, schedule: Schedule) -> Schedule:
        schedule = dataclasses.replace(schedule, id=new_task_id())
        row = schedule_row(schedule)
        self._run(lambda conn: conn.execute(INSERT_SCHEDULE, row))
        return schedule

    def get_schedule(self, schedule_id: str) -> Schedule:
        row = self._run(lambda conn: conn.execute(SELECT_SCHEDULE, (schedule_id,)).fetchone())
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def list_schedules(self) -> list[Schedule]:
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY seq"
            ).fetchall()
        )
        return [schedule_from_row(row) for row in rows]

    def delete_schedule(self, schedule_id: str) -> None:
        deleted = self._run(
            lambda conn: (
                conn.execute("DELETE FROM schedules WHERE id = %s", (schedule_id,)).rowcount
            )
        )
        if not deleted:
            raise schedule_not_found(schedule_id)

    def pause_schedule(self, schedule_id: str, paused: bool, next_fire: float) -> Schedule:
        row = self._run(
            lambda conn: conn.execute(
                f"UPDATE schedules SET paused = %s, next_fire = %s WHERE id = %s"
                f" RETURNING {SCHEDULE_COLUMNS}",
                (paused, next_fire, schedule_id),
            ).fetchone()
        )
        if row is None:
            raise schedule_not_found(schedule_id)
        return schedule_from_row(row)

    def due_schedules(self, now: float, limit: int) -> list[Schedule]:
        rows = self._run(
            lambda conn: conn.execute(
                f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire <= %s"
                " ORDER BY next_fire LIMIT %s",
                (now, limit),
            ).fetchall()
        )
        return [schedule_from_row(row) for row in rows]

    def next_schedule_fire(self) -> float | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT min(next_fire) FROM schedules WHERE NOT paused"
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    def fire_schedule(
        self, schedule_id: str, due: float, next_fire: float, fired: FiredTick | None, now: float
    ) -> str | None:
        tick = None if fired is None else fired.tick

        def work(conn: psycopg.Connection[Any]) -> str | None:
            # Of masters racing for one tick, the first UPDATE holds the row until
            # it commits; the others then read the new next_fire and match nothing.
            claimed = conn.execute(
                "UPDATE schedules SET next_fire = %s, last_fire = coalesce(%s, last_fire)"
                " WHERE id = %s AND next_fire = %s AND NOT paused",
                (next_fire, tick, schedule_id, due),
            ).rowcount
            if not claimed or fired is None:
                return None
            task_id = new_task_id()
            columns = [[value] for value in task_row(task_id, fired.spec, now)]
            conn.execute(INSERT, (PENDING, now, now, *columns))
            return task_id

        return self._run(work, atomic=True)
