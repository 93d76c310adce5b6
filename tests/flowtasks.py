"""Tasks the workflow tests (chain, group, chord) run on real workers."""

from __future__ import annotations

from taskfleet.worker import task


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def mul(a: int, b: int) -> int:
    return a * b


@task
def square_of(n: int) -> int:
    return n * n


@task
def total(values: list[int]) -> int:
    return sum(values)


@task
def fail(message: str) -> None:
    raise RuntimeError(message)
