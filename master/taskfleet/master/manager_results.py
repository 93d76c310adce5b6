"""The manager endpoint's result queue.

It holds the results of the tasks that manager clients put, in the order they
finish, fed by the CompletionHub (nobody polls the store), plus anything a
client puts on the result queue while holding no task, as a plain queue would.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from taskfleet.common.codec import decode_result
from taskfleet.common.model import Task, TaskState
from taskfleet.master.events import CompletionHub, Subscription
from taskfleet.master.store.base import Store

log = logging.getLogger("taskfleet.master.manager")


def result_item(task: Task) -> Any:
    """What a manager client gets for a final task: its return value, or, for a task
    that did not succeed, a RuntimeError saying why (a builtin exception, so any
    client can unpickle it, and never a value a JSON result could be)."""
    if task.state == TaskState.SUCCEEDED:
        return decode_result(task.result, task.result_content_type)
    why = f"{task.error.type}: {task.error.message}" if task.error else "no error recorded"
    return RuntimeError(f"taskfleet task {task.id} ({task.spec.name}) {task.state.name}: {why}")


class ResultFeed:
    """Results waiting for manager clients to get them, oldest first."""

    def __init__(self, hub: CompletionHub, store: Store) -> None:
        self._hub = hub
        self._store = store
        self._items: queue.Queue[Any] = queue.Queue()
        # Every watched task's subscription delivers into this one queue.
        self._finished: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._watching: dict[str, Subscription] = {}
        self._forwarder = threading.Thread(
            target=self._forward, name="manager-results", daemon=True
        )

    def start(self) -> None:
        self._forwarder.start()

    def watch(self, task_id: str) -> None:
        """Queue ``task_id``'s result once the task is final."""
        subscription = self._hub.subscribe([task_id], self._finished)
        with self._lock:
            self._watching[task_id] = subscription
        # Subscribed first, then read: a task that finished in between is not missed
        # (and one seen both ways is delivered once, see _forward).
        task = self._store.get(task_id)
        if task.state.is_final:
            self._finished.put(task)

    def put(self, item: Any) -> None:
        self._items.put(item)

    def get(self, timeout_s: float) -> Any:
        """The oldest result, waiting up to ``timeout_s``; raises queue.Empty."""
        return self._items.get(timeout=max(0.0, timeout_s))

    def qsize(self) -> int:
        return self._items.qsize()

    def close(self) -> None:
        self._finished.put(None)
        self._forwarder.join(timeout=5.0)
        with self._lock:
            subscriptions = list(self._watching.values())
            self._watching.clear()
        for subscription in subscriptions:
            subscription.close()

    def _forward(self) -> None:
        # A None comes from close() or from the hub waking everyone as the master stops.
        while (task := self._finished.get()) is not None:
            with self._lock:
                subscription = self._watching.pop(task.id, None)
            if subscription is None:
                continue  # delivered already
            subscription.close()
            item = result_item(task)
            if isinstance(item, RuntimeError):
                log.warning("manager task %s ended %s", task.id, task.state.name)
            self._items.put(item)
