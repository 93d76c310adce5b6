"""RQ's tasks for ``make bench-peers``: the same two as taskfleet's examples.

RQ finds a job's function by its dotted name, so the workers import this module
(they run in bench/) and the client enqueues these functions.
"""

from __future__ import annotations


def noop() -> None:
    """W1's task: no work at all, so the figure is the system's own cost per task."""


def square(n: int) -> int:
    """W2's and W3's task, as taskfleet.worker.examples.square."""
    return n * n
