"""The dashboard's live feed: one sampler for every open page.

Once a second the feed reads the overview (one ``stats`` call: the store's
counts, so every master sharing a store shows the same numbers) and, when it
differs from the last one or this master saw a state change, hands it to each
open event stream. However many pages are open, the store is asked once per
second; a page that reads slowly gets the newest overview, never a backlog.

The throughput chart comes from the same samples: tasks that reached a final
state, per ``BUCKET_S``, from the growth of the final counts (a purge or a
TTL prune shrinks them; a bucket never goes below zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from taskfleet.common.errors import StoreUnusable
from taskfleet.common.model import Stats, Task, TaskSpec, TaskState
from taskfleet.master.dashboard import views
from taskfleet.master.lifecycle import LifecycleListener
from taskfleet.master.runtime import MasterRuntime

log = logging.getLogger("taskfleet.master.dashboard")

INTERVAL_S = 1.0  # how often pages hear of changes: a batch per second at most
BUCKET_S = 10  # the throughput chart's bar width
BUCKETS = 60  # ten minutes of bars
Overview = dict[str, Any]


class Subscriber:
    """One open event stream: holds the newest overview it has not sent yet."""

    def __init__(self) -> None:
        self._slot: asyncio.Queue[Overview | None] = asyncio.Queue(maxsize=1)

    def offer(self, overview: Overview | None) -> None:
        with contextlib.suppress(asyncio.QueueEmpty):
            self._slot.get_nowait()  # an older overview nobody read: drop it
        self._slot.put_nowait(overview)

    async def next(self, timeout_s: float) -> Overview | None:
        """The next overview; None when the feed closes. TimeoutError when quiet."""
        async with asyncio.timeout(timeout_s):
            return await self._slot.get()


class LiveFeed(LifecycleListener):
    """Samples the overview once a second and tells subscribers what changed."""

    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime
        self._changed = False  # set from any thread by the lifecycle hooks
        self._subscribers: set[Subscriber] = set()
        self._last: Overview | None = None
        self._finished_total: int | None = None
        self._buckets: deque[tuple[int, int]] = deque(maxlen=BUCKETS)
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle hooks: this master changed something ------------------------

    def submitted(self, tasks: Sequence[TaskSpec]) -> None:
        self._changed = True

    def finished(self, tasks: Sequence[Task]) -> None:
        self._changed = True

    def retried(self, tasks: Sequence[Task]) -> None:
        self._changed = True

    def lost(self, tasks: Sequence[Task]) -> None:
        self._changed = True

    # -- reading ---------------------------------------------------------------

    async def overview(self) -> Overview:
        """The overview as it is now (one store call)."""
        return self._render(await self._rt.bridge.producers.run(self._rt.stats))

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscriber]:
        subscriber = Subscriber()
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dashboard-feed")

    def close(self) -> None:
        """Stop sampling and end every open stream."""
        if self._task is not None:
            self._task.cancel()
        for subscriber in self._subscribers:
            subscriber.offer(None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            try:
                stats = await self._rt.bridge.producers.run(self._rt.stats)
            except StoreUnusable:
                continue  # said once already; health reports NOT_SERVING
            except Exception:
                log.exception("dashboard feed could not read the store; trying again")
                continue
            self._sample(stats)
            overview = self._render(stats)
            changed, self._changed = self._changed, False
            if overview != self._last or changed:
                self._last = overview
                for subscriber in self._subscribers:
                    subscriber.offer(overview)

    def _sample(self, stats: Stats) -> None:
        total = sum(q.counts.get(s, 0) for q in stats.queues for s in TaskState if s.is_final)
        grown = 0 if self._finished_total is None else max(0, total - self._finished_total)
        self._finished_total = total
        bucket = int(time.time() // BUCKET_S)
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1] = (bucket, self._buckets[-1][1] + grown)
        else:
            self._buckets.append((bucket, grown))

    def _throughput(self) -> list[int]:
        """Finished tasks per bucket, oldest first, the current bucket last."""
        now = int(time.time() // BUCKET_S)
        counts = dict(self._buckets)
        return [counts.get(b, 0) for b in range(now - BUCKETS + 1, now + 1)]

    def _render(self, stats: Stats) -> Overview:
        return {
            "queues": [views.queue_counts(q) for q in stats.queues],
            "workers": [views.worker(w) for w in stats.workers],
            "masters": [views.master(m) for m in stats.masters],
            "throughput": {"bucket_s": BUCKET_S, "finished": self._throughput()},
        }
