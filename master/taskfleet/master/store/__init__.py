"""The master's task stores, chosen by the ``--store`` URL."""

from __future__ import annotations

import sqlite3

from taskfleet.common.errors import ConfigError
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
]

_SQLITE = "sqlite:"


def open_store(url: str, policy: StorePolicy = DEFAULT_POLICY) -> Store:
    """The store ``url`` names: ``memory`` or ``sqlite:PATH``.

    Raises ``ConfigError`` for any other form, or when the SQLite file cannot
    be opened, so a bad flag stops the master with a message, not a traceback.
    """
    if url == "memory":
        return MemoryStore(policy)
    if url.startswith(_SQLITE) and len(url) > len(_SQLITE):
        path = url.removeprefix(_SQLITE)
        try:
            return SqliteStore(path, policy)
        except sqlite3.Error as exc:
            raise ConfigError(f"--store {url}: cannot open {path}: {exc}") from exc
    raise ConfigError(f"--store {url!r} is not valid: use 'memory' or 'sqlite:PATH'")
