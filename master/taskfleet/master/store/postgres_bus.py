"""How masters sharing one PostgreSQL database see each other.

Two tables (schema version 2, see postgres.py): ``masters``, one row per live
master with the time it last beat, and ``workers``, the workers each master
holds a stream of, rewritten by its owner at every beat. A master that stops
beating is forgotten by the next beat of any other, its workers with it (a
foreign key cascades), so a master killed with ``kill -9`` leaves GetStats
within a few seconds.

Messages between masters are PostgreSQL notifications on one channel. They
are sent from application code, a few per batch of changes (never by a
per-row trigger: NOTIFY serialises commits on a global lock), and each is a
hint whose loss only delays what the polling in cluster.py also finds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from taskfleet.common.backoff import backoff_s
from taskfleet.common.model import MasterInfo, Task, WorkerInfo
from taskfleet.master.store.rows import CANCELLED, COLUMNS, FAILED, SUCCEEDED, task_from_row

log = logging.getLogger("taskfleet.master.bus")

CHANNEL = "taskfleet"
_LISTEN_TIMEOUT_S = 1.0  # how often the listening thread looks at ``stop``
_CONNECT_TIMEOUT_S = 10

MIGRATION = (
    """
    CREATE TABLE masters (
        master_id text PRIMARY KEY,
        hostname text NOT NULL,
        pid integer NOT NULL,
        listen text NOT NULL,
        started_at double precision NOT NULL,
        seen_at double precision NOT NULL
    )
    """,
    """
    CREATE TABLE workers (
        master_id text NOT NULL REFERENCES masters ON DELETE CASCADE,
        worker_id text NOT NULL,
        info text NOT NULL,
        PRIMARY KEY (master_id, worker_id)
    )
    """,
)

# --rate-limit (ratelimit.py): one token bucket per task name, shared by all masters.
RATE_MIGRATION = (
    """
    CREATE TABLE rate_buckets (
        key text PRIMARY KEY,
        tokens double precision NOT NULL,
        taken integer NOT NULL,
        at timestamptz NOT NULL
    )
    """,
)

# The bucket's tokens refilled for the time since its last take (by the database's
# clock, so masters need not agree on the time), at most the burst.
_AVAILABLE = "LEAST(%(burst)s, b.tokens + %(rate)s * GREATEST(0, extract(epoch FROM now() - b.at)))"
_TAKE_TOKENS = f"""
    INSERT INTO rate_buckets AS b (key, tokens, taken, at)
    VALUES (%(key)s, %(burst)s - LEAST(%(want)s, floor(%(burst)s)),
            LEAST(%(want)s, floor(%(burst)s)), now())
    ON CONFLICT (key) DO UPDATE SET
        tokens = {_AVAILABLE} - LEAST(%(want)s, floor({_AVAILABLE})),
        taken = LEAST(%(want)s, floor({_AVAILABLE})),
        at = GREATEST(b.at, now())
    RETURNING taken
"""

_MASTER_COLUMNS = "master_id, hostname, pid, listen, started_at, seen_at"

# The store's way of running statements: (work on a connection, in one transaction?).
Run = Callable[[Callable[[psycopg.Connection[Any]], Any], bool], Any]


class PostgresBus:
    """The bus of a PostgresStore: statements go through the store's ``run`` (its
    pool, which a reconnect replaces, and its error mapping); listening takes a
    connection of its own, since a pooled one cannot hold LISTEN."""

    def __init__(self, run: Run, dsn: str) -> None:
        self._run = run
        self._dsn = dsn

    def take_tokens(self, key: str, want: int, rate_per_s: float, burst: float) -> int:
        """One statement: PostgreSQL locks the row, and a take that waited for
        another computes its SET from the row that one left."""
        params = {"key": key, "want": want, "rate": rate_per_s, "burst": burst}

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(_TAKE_TOKENS, params).fetchone()
            return int(row[0]) if row else 0

        return int(self._run(work, True))

    def beat(
        self, me: MasterInfo, workers: Sequence[WorkerInfo], forget_after_s: float
    ) -> tuple[list[MasterInfo], list[WorkerInfo]]:
        infos = [json.dumps(_worker_json(w)) for w in workers]

        def work(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any]]:
            # The database's clock, not the masters': whether a master is silent
            # must not depend on how well two machines agree on the time.
            conn.execute(
                f"""INSERT INTO masters ({_MASTER_COLUMNS})
                VALUES (%s, %s, %s, %s, %s, extract(epoch FROM now()))
                ON CONFLICT (master_id) DO UPDATE SET seen_at = excluded.seen_at""",
                (me.master_id, me.hostname, me.pid, me.listen, me.started_at),
            )
            conn.execute(
                "DELETE FROM masters WHERE seen_at < extract(epoch FROM now()) - %s",
                (forget_after_s,),
            )
            conn.execute("DELETE FROM workers WHERE master_id = %s", (me.master_id,))
            if infos:
                conn.execute(
                    """INSERT INTO workers (master_id, worker_id, info)
                    SELECT %s, w.worker_id, w.info FROM unnest(%s::text[], %s::text[])
                        AS w(worker_id, info)""",
                    (me.master_id, [w.worker_id for w in workers], infos),
                )
            masters = conn.execute(
                f"SELECT {_MASTER_COLUMNS} FROM masters ORDER BY master_id"
            ).fetchall()
            others = conn.execute(
                "SELECT master_id, info FROM workers WHERE master_id <> %s", (me.master_id,)
            ).fetchall()
            return masters, others

        masters, others = self._run(work, True)
        return (
            [MasterInfo(*row) for row in masters],
            [_worker_from_json(master_id, json.loads(info)) for master_id, info in others],
        )

    def leave(self, master_id: str) -> None:
        self._run(
            lambda conn: conn.execute("DELETE FROM masters WHERE master_id = %s", (master_id,)),
            False,
        )

    def notify(self, messages: Sequence[str]) -> None:
        if messages:
            self._run(
                lambda conn: conn.execute(
                    "SELECT pg_notify(%s, m) FROM unnest(%s::text[]) AS m", (CHANNEL, messages)
                ),
                False,
            )

    def finished(self, task_ids: Sequence[str]) -> list[Task]:
        rows = self._run(
            lambda conn: conn.execute(
                f"""SELECT {COLUMNS} FROM tasks WHERE id = ANY(%s)
                AND state IN ({SUCCEEDED}, {FAILED}, {CANCELLED})""",
                (list(task_ids),),
            ).fetchall(),
            False,
        )
        return [task_from_row(row) for row in rows]

    def listen(self, deliver: Callable[[str | None], None], stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.info("listening for other masters again")
                        deliver(None)  # what was sent meanwhile is lost: look at everything
                    failures = 0
                    while not stop.is_set():
                        for notification in conn.notifies(timeout=_LISTEN_TIMEOUT_S):
                            deliver(notification.payload)
            except psycopg.Error as exc:
                failures += 1
                if failures == 1:
                    log.warning("lost the connection listening for other masters: %s", exc)
                stop.wait(backoff_s(failures, base_s=0.2, cap_s=2.0))


def _worker_json(info: WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": info.worker_id,
        "hostname": info.hostname,
        "pid": info.pid,
        "queues": list(info.queues),
        "task_names": list(info.task_names),
        "concurrency": info.concurrency,
        "running": info.running,
        "peer": info.peer,
        "connected_at": info.connected_at,
    }


def _worker_from_json(master_id: str, data: dict[str, Any]) -> WorkerInfo:
    return WorkerInfo(
        worker_id=data["worker_id"],
        hostname=data["hostname"],
        pid=data["pid"],
        queues=tuple(data["queues"]),
        task_names=tuple(data["task_names"]),
        concurrency=data["concurrency"],
        running=data["running"],
        peer=data["peer"],
        connected_at=data["connected_at"],
        master_id=master_id,
    )
