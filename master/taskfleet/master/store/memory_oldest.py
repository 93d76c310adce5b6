"""The memory store's answer to ``oldest_pending``: per queue, its ready tasks by
the time they became ready, so the oldest is at the top of a heap.

A task that leaves the ready set (leased, cancelled, deleted) leaves its entry
behind: the entry is dropped when it reaches the top and no longer matches
its task (lazy deletion, as the ready heaps do), or when the heap is rebuilt.
A heap is rebuilt from its live entries once it holds twice as many as after
the last rebuild (and a thousand more), so the leftovers of a busy queue cost
O(1) amortized per task and never outgrow the queue's own backlog.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

# (ready since, seq, task id): the heap top is the task that has waited longest.
SinceEntry = tuple[float, int, str]

# Leftover entries tolerated beyond twice the live ones, so that a small queue
# is not rebuilt at every other task.
_SLACK = 1024


class OldestReady:
    """Ready tasks per queue by when they became ready; ``live`` tells whether an
    entry still describes its task."""

    def __init__(self, live: Callable[[SinceEntry], bool]) -> None:
        self._live = live
        self._heaps: dict[str, list[SinceEntry]] = {}
        self._rebuild_at: dict[str, int] = {}  # a heap's length that triggers a rebuild

    def add(self, queue: str, entry: SinceEntry) -> None:
        heap = self._heaps.get(queue)
        if heap is None:
            heap = self._heaps[queue] = []
            self._rebuild_at[queue] = _SLACK
        heapq.heappush(heap, entry)
        if len(heap) > self._rebuild_at[queue]:
            heap[:] = [e for e in dict.fromkeys(heap) if self._live(e)]
            heapq.heapify(heap)
            self._rebuild_at[queue] = 2 * len(heap) + _SLACK

    def drop(self, queue: str) -> None:
        """Forget ``queue`` (its last task is gone)."""
        self._heaps.pop(queue, None)
        self._rebuild_at.pop(queue, None)

    def oldest(self) -> dict[str, float]:
        """For each queue with a ready task, when the oldest became ready."""
        found = {}
        for queue, heap in self._heaps.items():
            while heap and not self._live(heap[0]):
                heapq.heappop(heap)
            if heap:
                found[queue] = heap[0][0]
        return found
