"""Tasks as mypy sees them: ``make lint`` checks this file, so the types below
are part of the API. ``@task`` keeps the function's signature for ``submit``
and its return type for ``result``."""

from __future__ import annotations

from typing import assert_type

from taskfleet.client import TaskHandle
from taskfleet.worker import task


@task
def square(n: int) -> int:
    return n * n


@task(max_attempts=3, retry_on=(ConnectionError,))
def greet(name: str, *, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


def use() -> None:
    assert_type(square(3), int)  # a local call is the function's own
    handle = square.submit(7)
    assert_type(handle, TaskHandle[int])
    assert_type(handle.result(timeout_s=10), int)
    assert_type(greet.submit("ada", punctuation="?").result(), str)
    square.submit("seven")  # type: ignore[arg-type]
    greet.submit("ada", exclaim=True)  # type: ignore[call-arg]
