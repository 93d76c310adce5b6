"""The collector's settings of the master and worker processes (common/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from taskfleet.common.heap import settle_after_startup


class Node:
    other: Node | None = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settling_freezes_what_exists_and_reference_counting_still_frees_it(
    unfrozen_after: None,
) -> None:
    made_at_startup = [Node() for _ in range(100)]
    settle_after_startup()
    assert gc.get_freeze_count() >= len(made_at_startup)
    freed: list[int] = []
    weakref.finalize(made_at_startup[0], freed.append, 0)
    del made_at_startup
    assert freed == [0]  # no collection needed


def test_a_cycle_made_after_settling_is_still_collected(unfrozen_after: None) -> None:
    settle_after_startup()
    a, b = Node(), Node()
    a.other, b.other = b, a
    freed: list[str] = []
    weakref.finalize(a, freed.append, "a")
    del a, b
    assert freed == []  # a cycle: reference counting alone cannot free it
    gc.collect()
    assert freed == ["a"]
