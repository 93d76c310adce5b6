"""The master's task stores, chosen by the ``--store`` URL."""

from __future__ import annotations

import sqlite3

from taskfleet.common.errors import ConfigError
from taskfleet.common.store_urls import POSTGRES_SCHEMES, redacted
from taskfleet.master.store.base import DEFAULT_POLICY, Store, StorePolicy, TaskPage, TaskQuery
from taskfleet.master.store.memory import MemoryStore
from taskfleet.master.store.sqlite import SqliteStore

__all__ = [
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StorePolicy",
    "TaskPage",
    "TaskQuery",
    "open_store",
    "redacted",
]

_SQLITE = "sqlite:"


def open_store(url: str, policy: StorePolicy = DEFAULT_POLICY, *, poll_only: bool = False) -> Store:
    """The store ``url`` names: ``memory``, ``sqlite:PATH`` or a PostgreSQL URL
    (with ``poll_only``, reached through a pooler that cannot hold prepared
    statements).

    Raises ``ConfigError`` for any other form, or when the SQLite file or the
    database cannot be opened, so a bad flag stops the master with a message,
    not a traceback.
    """
    if url == "memory":
        return MemoryStore(policy)
    if url.startswith(_SQLITE) and len(url) > len(_SQLITE):
        path = url.removeprefix(_SQLITE)
        try:
            return SqliteStore(path, policy)
        except sqlite3.Error as exc:
            raise ConfigError(f"--store {url}: cannot open {path}: {exc}") from exc
    if url.startswith(POSTGRES_SCHEMES):
        return _open_postgres(url, policy, prepare=not poll_only)
    raise ConfigError(
        f"--store {redacted(url)!r} is not valid: use 'memory', 'sqlite:PATH' "
        "or 'postgresql://USER@HOST[:PORT]/DB'"
    )


def _open_postgres(dsn: str, policy: StorePolicy, *, prepare: bool) -> Store:
    """A PostgresStore; imported here so that psycopg is needed only by those who use it."""
    try:
        from taskfleet.master.store.postgres import PostgresStore
    except ImportError as exc:
        raise ConfigError(
            f"--store postgresql://... needs psycopg ({exc.name} is not installed): "
            "pip install 'taskfleet[postgres]'"
        ) from None
    return PostgresStore(dsn, policy, prepare=prepare)
