"""When the memory store's finished tasks are deleted: their seqs in buckets by
the second their result TTL runs out, and a heap of those seconds.

Not a heap of (expires_at, seq, id) tuples: that list held an entry per task
kept, and every full collection walked it. An array of ints is no object the
garbage collector knows, nor is a dict of arrays; the heap of seconds holds
one entry per second, however many tasks end in it.
"""

from __future__ import annotations

import array
import heapq
from collections.abc import Callable


class Expiring:
    """Seqs of finished tasks by when they expire. A task retried since it was
    added here stays in its bucket; ``sweep`` asks the store for its expiry now."""

    def __init__(self) -> None:
        self._buckets: dict[int, array.array[int]] = {}
        self._seconds: list[int] = []

    def add(self, expires_at: float, seq: int) -> None:
        second = int(expires_at)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = array.array("q")
            heapq.heappush(self._seconds, second)
        bucket.append(seq)

    def sweep(
        self,
        now: float,
        limit: int,
        expiry: Callable[[int], float | None],
        delete: Callable[[int], None],
    ) -> int:
        """``delete`` up to ``limit`` tasks whose expiry (``expiry`` of their seq:
        None when the task is gone or no longer final) is due by ``now``."""
        deleted = 0
        while self._seconds and self._seconds[0] <= now and deleted < limit:
            second = self._seconds[0]
            bucket = self._buckets[second]
            left = array.array("q")
            for i, seq in enumerate(bucket):
                if deleted == limit:
                    left.extend(bucket[i:])
                    break
                at = expiry(seq)
                # Gone, alive again, or ended again later: its bucket is another.
                if at is None or int(at) != second:
                    continue
                if at > now:
                    left.append(seq)
                else:
                    delete(seq)
                    deleted += 1
            if left:  # the limit, or the rest of the current second
                self._buckets[second] = left
                break
            del self._buckets[second]
            heapq.heappop(self._seconds)
        return deleted
