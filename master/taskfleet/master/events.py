"""In-process notifications inside the master.

``CompletionHub`` feeds WaitTasks: a waiter subscribes to task ids and is
handed each task as it becomes final, so nobody polls the store; a waiter that
asked for progress is also handed each stored progress update of those tasks
(a ``Progress``, into the same inbox, so it never overtakes the final task). Tasks become
final on the event loop (worker results, cancels) and in the manager
endpoint's threads, so a subscription's inbox must take puts from any thread:
a ``queue.SimpleQueue`` for a waiting thread, a ``LoopQueue`` for a task on the
loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from taskfleet.common.model import Progress, Task
from taskfleet.master.lifecycle import LifecycleListener


class Inbox(Protocol):
    """Where a subscription's tasks go; ``put`` is safe from any thread."""

    def put(self, item: Task | None) -> None: ...


class ProgressInbox(Protocol):
    """An inbox that takes progress updates too."""

    def put(self, item: Task | Progress | None) -> None: ...


class Subscription:
    """Final tasks for one waiter, delivered into an inbox (its own, or one that
    several subscriptions share), and progress updates into ``progress`` if it
    asked for them; None means "stop waiting"."""

    def __init__(
        self,
        hub: CompletionHub,
        task_ids: frozenset[str],
        finished: Inbox,
        progress: ProgressInbox | None,
    ) -> None:
        self.task_ids = task_ids
        self.finished = finished
        self.progress = progress
        self._hub = hub

    def wake(self) -> None:
        """Unblock the waiter (it was cancelled or the master is stopping)."""
        self.finished.put(None)

    def close(self) -> None:
        self._hub.unsubscribe(self)


class CompletionHub(LifecycleListener):
    """Routes each final task to the subscriptions that wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, list[Subscription]] = {}
        # The subscriptions that asked for progress too, apart: a progress update
        # nobody asked for costs one dict lookup.
        self._progress_by_task: dict[str, list[Subscription]] = {}

    def subscribe(
        self, task_ids: Iterable[str], finished: Inbox, progress: ProgressInbox | None = None
    ) -> Subscription:
        subscription = Subscription(self, frozenset(task_ids), finished, progress)
        with self._lock:
            for task_id in subscription.task_ids:
                self._by_task.setdefault(task_id, []).append(subscription)
            if progress is not None:
                for task_id in subscription.task_ids:
                    self._progress_by_task.setdefault(task_id, []).append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            _remove(self._by_task, subscription)
            if subscription.progress is not None:
                _remove(self._progress_by_task, subscription)

    def finished(self, tasks: Sequence[Task]) -> None:
        self.publish(tasks)

    def progressed(self, updates: Sequence[Progress]) -> None:
        self.publish_progress(updates)

    def publish_progress(self, updates: Iterable[Progress]) -> None:
        """Hand each update to the subscriptions that asked for its task's progress."""
        with self._lock:
            if not self._progress_by_task:
                return
            deliveries = [
                (s, u) for u in updates for s in self._progress_by_task.get(u.ref.task_id, ())
            ]
        for subscription, update in deliveries:
            if subscription.progress is not None:
                subscription.progress.put(update)

    def waited(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Those of ``task_ids`` (all, for None) that someone waits for."""
        with self._lock:
            if task_ids is None:
                return list(self._by_task)
            return [task_id for task_id in task_ids if task_id in self._by_task]

    def publish(self, tasks: Iterable[Task]) -> None:
        with self._lock:
            if not self._by_task:
                return
            deliveries = [(s, t) for t in tasks for s in self._by_task.get(t.id, ())]
        for subscription, task in deliveries:
            subscription.finished.put(task)

    def wake_all(self) -> None:
        with self._lock:
            subscriptions = {id(s): s for ws in self._by_task.values() for s in ws}
        for subscription in subscriptions.values():
            subscription.wake()


def _remove(index: dict[str, list[Subscription]], subscription: Subscription) -> None:
    for task_id in subscription.task_ids:
        waiters = index.get(task_id)
        if waiters is None:
            continue
        waiters.remove(subscription)
        if not waiters:
            del index[task_id]
