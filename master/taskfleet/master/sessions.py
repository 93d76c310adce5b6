"""Connected workers: one ``WorkerSession`` per worker stream, and the
``Sessions`` registry that wakes them when work arrives."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Collection, Sequence

from taskfleet.common.model import LeaseRef, Task, WorkerInfo
from taskfleet.master.lifecycle import LifecycleListener
from taskfleet.master.loop import LoopBridge
from taskfleet.v1 import worker_pb2


class WorkerSession:
    """What the master knows about one worker stream.

    Its state changes only on the event loop (``Sessions`` hands calls from
    other threads over), so no lock guards it: the stream's dispatcher sleeps
    on ``changed`` until there is a message to send or the worker has credit
    and work may be waiting.
    """

    def __init__(self, info: WorkerInfo) -> None:
        self.info = info
        self.changed = asyncio.Event()
        self.credit = 0
        self.running = 0
        self.work_hint = True  # check the store once on connect
        self.closed = False
        self.failure: Exception | None = None  # why the worker's side of the stream broke
        self.outbox: list[worker_pb2.MasterMessage] = []
        self.results_ack = 0  # the highest Results seq recorded and not yet acknowledged
        self.last_heard = time.monotonic()  # any message from the worker counts

    def send(self, message: worker_pb2.MasterMessage) -> None:
        self.outbox.append(message)
        self.changed.set()

    def ack_results(self, seq: int, credit: int) -> None:
        """Acknowledge Results up to ``seq`` and add the credit they carried, at once:
        the dispatcher then answers both with one message."""
        self.results_ack = max(self.results_ack, seq)
        if credit:
            self.credit += credit
            self.work_hint = True
        self.changed.set()

    def add_credit(self, tasks: int) -> None:
        self.credit += tasks
        self.work_hint = True
        self.changed.set()

    def hint_work(self) -> None:
        self.work_hint = True
        if self.credit > 0:
            self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    def revoke(self, refs: Sequence[LeaseRef]) -> None:
        self.send(
            worker_pb2.MasterMessage(
                revoke=worker_pb2.Revoke(
                    leases=[worker_pb2.LeaseRef(task_id=r.task_id, lease=r.lease) for r in refs]
                )
            )
        )


class Sessions(LifecycleListener):
    """All live worker sessions, by worker id. Safe from any thread: wake-ups
    from outside the loop are handed to it."""

    def __init__(self, bridge: LoopBridge) -> None:
        self._bridge = bridge
        self._lock = threading.Lock()
        self._by_worker: dict[str, WorkerSession] = {}

    def add(self, session: WorkerSession) -> None:
        """Register ``session``, closing an older stream of the same worker."""
        with self._lock:
            old = self._by_worker.get(session.info.worker_id)
            self._by_worker[session.info.worker_id] = session
        if old is not None:
            self._bridge.call(old.close)

    def remove(self, session: WorkerSession) -> None:
        with self._lock:
            if self._by_worker.get(session.info.worker_id) is session:
                del self._by_worker[session.info.worker_id]

    def get(self, worker_id: str) -> WorkerSession | None:
        with self._lock:
            return self._by_worker.get(worker_id)

    def cancelled(self, task: Task) -> None:
        # If it was running, its worker stops it now rather than at the next
        # heartbeat; a worker that no longer holds that lease ignores this.
        if task.worker_id:
            self.revoke(task.worker_id, [LeaseRef(task.id, task.lease)])

    def revoke(self, worker_id: str, refs: Sequence[LeaseRef]) -> bool:
        """Tell ``worker_id`` to stop ``refs``; whether it has a stream here."""
        session = self.get(worker_id)
        if session is not None:
            self._bridge.call(session.revoke, refs)
        return session is not None

    def work_available(
        self,
        queues: Collection[str] | None,
        names: Collection[str] | None = None,
        tasks: int | None = None,
    ) -> None:
        """Tell the workers with free slots that serve ``queues`` (all workers for
        None), and run one of ``names`` when given, that new work may be ready.

        Each worker woken asks the store for work, so with ``tasks`` (how many
        are new) only enough wake to take them, by their free slots; the others
        see the work at their next look (within ``IDLE_RECHECK_S``)."""
        if not self._bridge.in_loop():  # one hand-off in all
            self._bridge.call(self.work_available, queues, names, tasks)
            return
        wanted_queues = None if queues is None else frozenset(queues)
        wanted_names = None if names is None else frozenset(names)
        with self._lock:
            sessions = list(self._by_worker.values())
        for session in sessions:
            if not _serves(session.info, wanted_queues, wanted_names):
                continue
            if tasks is None:
                session.hint_work()
            elif tasks > 0 and session.credit > 0:
                session.hint_work()
                tasks -= session.credit

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._by_worker.values())
        for session in sessions:
            self._bridge.call(session.close)

    def infos(self) -> list[WorkerInfo]:
        with self._lock:
            sessions = list(self._by_worker.values())
        infos = [dataclasses.replace(s.info, running=s.running) for s in sessions]
        return sorted(infos, key=lambda i: i.worker_id)


def _serves(info: WorkerInfo, queues: frozenset[str] | None, names: frozenset[str] | None) -> bool:
    """Whether a worker takes tasks of one of ``queues`` named one of ``names``."""
    if queues is not None and not any(q in queues for q in info.queues):
        return False
    return names is None or not info.task_names or not names.isdisjoint(info.task_names)
