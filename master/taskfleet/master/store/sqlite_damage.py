"""Damage in a SQLite store file: which errors mean the file cannot be trusted,
and the check at open that looks for it before the master serves.

A damaged file is looked for at open (see ``_check``) and noticed on any call
that reads a damaged page: from then on every call raises ``StoreUnusable``
naming the file and what to do, without touching the file again, since
writing to a damaged b-tree can spread the damage.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

from taskfleet.master.store.rows import RUNNING
from taskfleet.master.store.sqlite_schema import DELAYED, READY

# PRAGMA quick_check reads every page: measured on a 1 GB file, 1.8-2.1 s with
# the file in the OS cache and 27 s from disk, too long for every start. Up to
# this size the whole file is checked at open (under 0.2 s from the cache, about
# 1.5 s from disk); a larger one gets CHEAP_CHECKS, and the full check is the
# operator's to run (README: 'A damaged store file').
# (PRAGMA quick_check(N) is no cheaper: N caps the findings, not the pages read.)
FULL_CHECK_MAX_BYTES = 64 * 1024 * 1024

# Result codes (primary, the low byte) that mean the file cannot be trusted.
DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_IOERR}

# What the master reads first, checked for a large file: the schema, the counts,
# and every page of the indexes of queued, delayed and running tasks. It grows
# with the tasks queued, not with the file: 30 ms from disk for a 1 GB file
# holding 20,000 queued tasks.
CHEAP_CHECKS = (
    "PRAGMA quick_check(counts)",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_ready_by_name WHERE {READY}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_ready_by_queue WHERE {READY}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_delayed WHERE {DELAYED}",
    f"SELECT count(*) FROM tasks INDEXED BY tasks_running WHERE state = {RUNNING}",
)


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged, rather than one statement wrong."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in DAMAGE_CODES


def find_damage(db: sqlite3.Connection, path: str) -> str | None:
    """What is wrong with the file at ``path`` (open as ``db``), or None: the whole
    file is checked when it is small enough (see FULL_CHECK_MAX_BYTES), else what
    the master reads first."""
    size_bytes = sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))
    full = size_bytes <= FULL_CHECK_MAX_BYTES
    for statement in ("PRAGMA quick_check",) if full else CHEAP_CHECKS:
        rows = db.execute(statement).fetchall()
        if statement.startswith("PRAGMA") and rows != [("ok",)]:
            return _first_problem(rows)
    return None


def _first_problem(rows: Sequence[tuple[str]]) -> str:
    """What quick_check reported, on one line: its first finding and how many more."""
    lines = [line for row in rows for line in str(row[0]).splitlines()]
    found = [line for line in lines if not line.startswith("***")]  # "*** in database main ***"
    first = found[0] if found else "no details"
    more = f", and {len(found) - 1} more findings" if len(found) > 1 else ""
    return f"quick_check: {first}{more}"
