"""The PostgreSQL store's connections: a small pool, transactions that lost a
race run again, and what a call does when the server goes away.

When the server goes away (stopped, restarted, unreachable), a call fails
with ``StoreUnavailable`` within ``_POOL_TIMEOUT_S``, and from then on at once,
without waiting on a pool whose connections all died with the server: the
master's watch calls ``ping`` until the database answers, and that first
answer brings a fresh pool. No connection is checked when it is taken from
the pool: psycopg_pool's check costs a round trip per call (a one-row get
took 193 us instead of 123 us, best of 20 runs on this machine). A dead one
fails the call it serves instead, and that failure is what starts the watch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from taskfleet.common.errors import StoreUnavailable

# Transactions that lost a race (a deadlock on the counts, an idempotency key
# inserted at the same time) run again; more than this many losses is a bug.
_RACE_RETRIES = 5
_POOL_MAX_SIZE = 4
_PREPARE_THRESHOLD = 5
CONNECT_TIMEOUT_S = 10
# How long a call waits for a pooled connection: psycopg_pool's 30 s would hold
# every caller (and the master's store threads) that long when the server dies.
_POOL_TIMEOUT_S = 5.0
# A ping while the database is away: a server that is down refuses at once, a
# host that is cut off must not hold the watch for long.
_PING_CONNECT_TIMEOUT_S = 3

_RACES = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.UniqueViolation)

R = TypeVar("R")


class PostgresConnections:
    """The pool a PostgreSQL store runs its statements on (``_run``), and its
    recovery after an outage (``ping``)."""

    _dsn: str
    _prepare: bool
    _pool: ConnectionPool
    _lost_lock: threading.Lock
    _lost: str  # why the database is unreachable, while it is
    on_unavailable: Callable[[], None] | None

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(
            self._dsn,
            min_size=1,
            max_size=_POOL_MAX_SIZE,
            kwargs={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "autocommit": True,
                # None: never prepare (a transaction-mode pooler cannot hold them);
                # otherwise psycopg prepares a statement on its fifth run.
                "prepare_threshold": _PREPARE_THRESHOLD if self._prepare else None,
            },
            timeout=_POOL_TIMEOUT_S,
            name="taskfleet-store",
            open=True,
        )

    def _run(self, work: Callable[[psycopg.Connection[Any]], R], atomic: bool = False) -> R:
        """``work`` on a pooled connection, in one transaction if ``atomic``; run
        again when it lost a race to another."""
        for attempt in range(_RACE_RETRIES):
            if self._lost:
                raise StoreUnavailable(self._lost)
            pool = self._pool
            try:
                with pool.connection() as conn:
                    if not atomic:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
            except _RACES:
                if attempt == _RACE_RETRIES - 1:
                    raise
            except psycopg.OperationalError as exc:
                if not _unreachable(exc):
                    raise
                raise self._lose(exc, pool) from None
        raise AssertionError("unreachable")

    def _lose(self, exc: psycopg.OperationalError, pool: ConnectionPool) -> StoreUnavailable:
        """Note that the server is gone: calls fail at once until ``ping`` finds it
        back, and the master hears of it once. A call in flight when the server
        died may have committed or not; its caller learns only that it failed.
        A call that failed on a pool already replaced tells nothing new."""
        with self._lost_lock:
            first = not self._lost and pool is self._pool
            if first:
                self._lost = f"database unreachable: {first_line(exc)}"
            message = self._lost or f"database unreachable: {first_line(exc)}"
        if first and self.on_unavailable is not None:
            self.on_unavailable()
        return StoreUnavailable(message)

    def ping(self) -> None:
        if not self._lost:
            try:
                self._run(lambda conn: conn.execute("SELECT 1"))
                return
            except StoreUnavailable:
                pass  # maybe only the pool's connections died, with a server now back
        try:
            with psycopg.connect(
                self._dsn, connect_timeout=_PING_CONNECT_TIMEOUT_S, autocommit=True
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            # The pool's connections died with the server, and its own reconnecting
            # would back off to minutes and log every attempt: closed (once).
            self._pool.close()
            raise StoreUnavailable(f"database unreachable: {first_line(exc)}") from None
        dead, self._pool = self._pool, self._new_pool()
        with self._lost_lock:
            self._lost = ""
        dead.close()


def _unreachable(exc: psycopg.OperationalError) -> bool:
    """Whether ``exc`` says the server is gone (or cannot be reached) rather than
    refusing one statement: no SQLSTATE (the connection broke, or the pool had
    none to give), a connection exception (08) or an operator intervention such
    as a shutdown (57P)."""
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
