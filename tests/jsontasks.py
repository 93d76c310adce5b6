"""Tasks for the strict-JSON tests: results JSON readers refuse, and huge errors."""

from __future__ import annotations

from typing import Any

from taskfleet.worker import task


@task
def non_finite(kind: str) -> Any:
    """A result holding NaN or an infinity, deep inside, as numpy code often returns."""
    return {"mean": [1.0, float(kind)]}


@task
def raise_long(n_chars: int) -> None:
    raise ValueError("x" * n_chars)
