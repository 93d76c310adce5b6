"""Connected workers: one ``WorkerSession`` per worker stream, and the
``Sessions`` registry that wakes them when work arrives."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Collection, Sequence

from taskfleet.common.model import LeaseRef, Task, WorkerInfo
from taskfleet.master.lifecycle import LifecycleListener
from taskfleet.v1 import worker_pb2


class WorkerSession:
    """What the master knows about one worker stream.

    The stream's response generator sleeps on ``cond`` until there is a
    message to send or the worker has credit and work may be waiting.
    """

    def __init__(self, info: WorkerInfo) -> None:
        self.info = info
        self.cond = threading.Condition()
        self.credit = 0
        self.running = 0
        self.work_hint = True  # check the store once on connect
        self.closed = False
        self.outbox: list[worker_pb2.MasterMessage] = []
        self.results_ack = 0  # the highest Results seq recorded and not yet acknowledged
        self.last_heard = time.monotonic()  # any message from the worker counts

    def send(self, message: worker_pb2.MasterMessage) -> None:
        with self.cond:
            self.outbox.append(message)
            self.cond.notify()

    def ack_results(self, seq: int, credit: int) -> None:
        """Acknowledge Results up to ``seq`` and add the credit they carried, at once:
        the dispatcher then answers both with one message."""
        with self.cond:
            self.results_ack = max(self.results_ack, seq)
            if credit:
                self.credit += credit
                self.work_hint = True
            self.cond.notify()

    def add_credit(self, tasks: int) -> None:
        with self.cond:
            self.credit += tasks
            self.work_hint = True
            self.cond.notify()

    def hint_work(self) -> None:
        with self.cond:
            self.work_hint = True
            if self.credit > 0:
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def revoke(self, refs: Sequence[LeaseRef]) -> None:
        self.send(
            worker_pb2.MasterMessage(
                revoke=worker_pb2.Revoke(
                    leases=[worker_pb2.LeaseRef(task_id=r.task_id, lease=r.lease) for r in refs]
                )
            )
        )


class Sessions(LifecycleListener):
    """All live worker sessions, by worker id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_worker: dict[str, WorkerSession] = {}

    def add(self, session: WorkerSession) -> None:
        """Register ``session``, closing an older stream of the same worker."""
        with self._lock:
            old = self._by_worker.get(session.info.worker_id)
            self._by_worker[session.info.worker_id] = session
        if old is not None:
            old.close()

    def remove(self, session: WorkerSession) -> None:
        with self._lock:
            if self._by_worker.get(session.info.worker_id) is session:
                del self._by_worker[session.info.worker_id]

    def get(self, worker_id: str) -> WorkerSession | None:
        with self._lock:
            return self._by_worker.get(worker_id)

    def work_available(
        self, queues: Collection[str] | None, names: Collection[str] | None, tasks: int | None
    ) -> None:
        self.hint_work()

    def cancelled(self, task: Task) -> None:
        # If it was running, its worker stops it now rather than at the next
        # heartbeat; a worker that no longer holds that lease ignores this.
        session = self.get(task.worker_id) if task.worker_id else None
        if session is not None:
            session.revoke([LeaseRef(task.id, task.lease)])

    def hint_work(self) -> None:
        """Tell every worker with free slots that new work may be ready."""
        with self._lock:
            sessions = list(self._by_worker.values())
        for session in sessions:
            session.hint_work()

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._by_worker.values())
        for session in sessions:
            session.close()

    def infos(self) -> list[WorkerInfo]:
        with self._lock:
            sessions = list(self._by_worker.values())
        infos = [dataclasses.replace(s.info, running=s.running) for s in sessions]
        return sorted(infos, key=lambda i: i.worker_id)
