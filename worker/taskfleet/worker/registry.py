"""The ``@task`` decorator and the registry of task functions.

The registry is the one module-level registry in taskfleet: a plain dict from
task name to definition, filled when a tasks module is imported, and reset by
tests with ``REGISTRY.clear()``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar, overload

from taskfleet.common.errors import ConfigError
from taskfleet.common.frozen import frozen
from taskfleet.common.model import INT32_MAX, MAX_DURATION_S
from taskfleet.worker.task_function import TaskFunction

P = ParamSpec("P")
R = TypeVar("R")


@frozen
class TaskDefinition:
    """A registered function and the defaults a TaskSpec may override."""

    name: str
    func: Callable[..., Any]
    max_attempts: int = 1
    timeout_s: float = 0.0  # 0: no limit
    # The exceptions worth another attempt; None: every one.
    retry_on: tuple[type[BaseException], ...] | None = None
    backoff_s: float = 0.0  # 0: the master's backoff
    backoff_max_s: float = 0.0  # 0: no cap

    def retry_delay_s(self, attempt: int) -> float:
        """The wait before the attempt after ``attempt`` (1-based) failed; 0 leaves
        it to the master."""
        if not self.backoff_s:
            return 0.0
        delay_s = self.backoff_s * 2.0 ** min(attempt - 1, 30)
        return min(delay_s, self.backoff_max_s) if self.backoff_max_s else delay_s


class Retry(Exception):
    """Raise in a task to run it again after ``delay_s`` seconds.

    It counts as an attempt: with none left, the task ends FAILED with error
    type ``Retry``."""

    def __init__(self, delay_s: float = 0.0, message: str = "") -> None:
        if not 0 <= delay_s <= MAX_DURATION_S:  # NaN too: no Duration holds it
            raise ValueError(f"delay_s must be 0 to {MAX_DURATION_S} s, not {delay_s}")
        super().__init__(message or f"the task asked to run again in {delay_s:g} s")
        self.delay_s = delay_s


REGISTRY: dict[str, TaskDefinition] = {}


@overload
def task(func: Callable[P, R], /) -> TaskFunction[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    max_attempts: int = 1,
    timeout_s: float = 0.0,
    retry_on: Iterable[type[BaseException]] | None = None,
    backoff_s: float = 0.0,
    backoff_max_s: float = 0.0,
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...


def task(
    func: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    max_attempts: int = 1,
    timeout_s: float = 0.0,
    retry_on: Iterable[type[BaseException]] | None = None,
    backoff_s: float = 0.0,
    backoff_max_s: float = 0.0,
) -> TaskFunction[P, R] | Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Register a function as a task, under its ``__name__`` unless ``name`` is given.

    ``max_attempts`` and ``timeout_s`` are defaults for tasks whose spec leaves
    them at zero. A failed attempt is retried while attempts remain, for any
    exception, or only for those ``retry_on`` names (others end the task at
    once); after ``backoff_s`` doubling up to ``backoff_max_s``, or the master's
    backoff when 0. What comes back still runs the function when called, and
    also submits it: ``f.submit(...)``, ``f.submit_with(...)`` (task_function.py).
    """
    if not 1 <= max_attempts <= INT32_MAX:  # each outcome carries it as an int32
        raise ValueError(f"max_attempts must be 1 to {INT32_MAX}, not {max_attempts}")
    if timeout_s < 0 or backoff_s < 0 or backoff_max_s < 0:
        raise ValueError("timeout_s, backoff_s and backoff_max_s must not be negative")
    retry_types = None if retry_on is None else tuple(retry_on)
    if retry_types is not None and not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in retry_types
    ):
        raise TypeError("retry_on: name exception classes, such as (ConnectionError,)")

    def register(f: Callable[P, R]) -> TaskFunction[P, R]:
        task_name = name or f.__name__
        existing = REGISTRY.get(task_name)
        if (
            existing is not None
            and existing.func is not f
            and _qualname(existing.func) != _qualname(f)
        ):
            raise ValueError(
                f"task name {task_name!r} is already registered by {_qualname(existing.func)}"
            )
        REGISTRY[task_name] = TaskDefinition(
            task_name, f, max_attempts, timeout_s, retry_types, backoff_s, backoff_max_s
        )
        return TaskFunction(f, task_name)

    return register(func) if func is not None else register


def _qualname(f: Callable[..., Any]) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def import_task_modules(modules: Iterable[str]) -> dict[str, TaskDefinition]:
    """Import the user's task modules (from the working directory too, as a user
    running ``taskfleet worker`` in their project expects) and return the registry."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--tasks: cannot import {module!r}: {exc}") from exc
    return REGISTRY
