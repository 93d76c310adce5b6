"""Choosing a pool: the one module that knows every implementation.

It lives apart from ``pool`` (the interface), which each implementation imports:
nothing imports this module back, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from taskfleet.common.errors import ConfigError
from taskfleet.worker.pool import OnDone, Pool
from taskfleet.worker.process_pool import ProcessPool
from taskfleet.worker.thread_pool import ThreadPool


def make_pool(kind: str, size: int, task_modules: Sequence[str], on_done: OnDone) -> Pool:
    """The pool ``--pool`` names: "process" (CPU-bound work) or "thread" (IO-bound)."""
    if kind == "process":
        return ProcessPool(size, task_modules, on_done)
    if kind == "thread":
        return ThreadPool(size, task_modules, on_done)
    raise ConfigError(f"--pool: unknown pool kind {kind!r}; use 'process' or 'thread'")
