"""In-process notifications inside the master.

``CompletionHub`` feeds WaitTasks: a waiter subscribes to task ids and is
handed each task as it becomes final, so nobody polls the store. Tasks become
final on the event loop (worker results, cancels) and in the manager
endpoint's threads, so a subscription's inbox must take puts from any thread:
a ``queue.SimpleQueue`` for a waiting thread, a ``LoopQueue`` for a task on the
loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from taskfleet.common.model import Task
from taskfleet.master.lifecycle import LifecycleListener


class Inbox(Protocol):
    """Where a subscription's tasks go; ``put`` is safe from any thread."""

    def put(self, item: Task | None) -> None: ...


class Subscription:
    """Final tasks for one waiter, delivered into an inbox (its own, or one that
    several subscriptions share); None means "stop waiting"."""

    def __init__(self, hub: CompletionHub, task_ids: frozenset[str], finished: Inbox) -> None:
        self.task_ids = task_ids
        self.finished = finished
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

    def subscribe(self, task_ids: Iterable[str], finished: Inbox) -> Subscription:
        subscription = Subscription(self, frozenset(task_ids), finished)
        with self._lock:
            for task_id in subscription.task_ids:
                self._by_task.setdefault(task_id, []).append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            for task_id in subscription.task_ids:
                waiters = self._by_task.get(task_id)
                if waiters is None:
                    continue
                waiters.remove(subscription)
                if not waiters:
                    del self._by_task[task_id]

    def finished(self, tasks: Sequence[Task]) -> None:
        self.publish(tasks)

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
