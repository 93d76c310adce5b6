"""The collector's settings of the master and worker processes (common/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from taskfleet.common.heap import YOUNG_COLLECTION_OBJECTS, settle_after_startup


class Node:
    other: Node | None = None


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settling_freezes_what_exists_and_collects_the_young_less_often(
    restored_collector: None,
) -> None:
    thresholds = gc.get_threshold()
    made_at_startup = [Node() for _ in range(100)]
    settle_after_startup()
    assert gc.get_freeze_count() >= len(made_at_startup)
    assert gc.get_threshold() == (YOUNG_COLLECTION_OBJECTS, *thresholds[1:])
    freed: list[int] = []
    weakref.finalize(made_at_startup[0], freed.append, 0)
    del made_at_startup
    assert freed == [0]  # reference counting frees a frozen object, no collection needed


def test_a_cycle_made_after_settling_is_still_collected(restored_collector: None) -> None:
    settle_after_startup()
    a, b = Node(), Node()
    a.other, b.other = b, a
    freed: list[str] = []
    weakref.finalize(a, freed.append, "a")
    del a, b
    assert freed == []  # a cycle: reference counting alone cannot free it
    gc.collect()
    assert freed == ["a"]
