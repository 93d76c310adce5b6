"""Masters that share one store, kept in step (PostgreSQL; see docs/scaling.md).

Each master is stateless apart from its open streams, so what one master must
learn from another is only what its own streams wait for:

- new work, so its idle workers look at once (``work_available``);
- delayed tasks, so its due timer knows their time (``submitted``, ``retried``);
- final tasks, so its WaitTasks callers hear of them (``finished``);
- progress of running tasks, for its WaitTasks callers that asked for it
  (``progressed``: the update itself travels, the latest per task per message,
  so no master reads the store for it);
- cancels of tasks its workers run, so they stop at once (``cancelled``).

A ``Cluster`` is a lifecycle listener: it gathers these from the local
lifecycle and sends them to the other masters as notifications on the bus, a
few per batch of changes (at most one message of each kind per
``DEBOUNCE_S``), and only while another master is alive to hear them.
Notifications are hints: a lost one delays, never strands, because once a
second each master also polls (the final states of what its callers wait for,
the next delayed task) and its idle workers recheck the store on their own.
With ``poll_only`` (PgBouncer in transaction mode, which cannot hold a LISTEN)
that polling is all there is. Progress is not polled: a lost update is
overtaken by the next one, and the final task carries the last; so with
``poll_only`` a wait hears only the progress of tasks its own master's
workers run.

Each master beats once a second into the database with its workers, so
GetStats on any master lists every master and every worker; a master silent
for a lease period (at least ``5 * BEAT_S``) is forgotten, as its workers'
leases lapse: they have moved to another master by then, or are gone.

Housekeeping needs no leader: every master runs ``expire`` and ``prune``,
whose statements skip the rows another master holds, so each lapsed lease is
returned once, and no master's death delays it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from taskfleet.common.identity import process_name
from taskfleet.common.model import (
    LeaseRef,
    MasterInfo,
    Progress,
    Task,
    TaskSpec,
    WorkerInfo,
)
from taskfleet.master.delays import DueTimer
from taskfleet.master.events import CompletionHub
from taskfleet.master.lifecycle import LifecycleListener
from taskfleet.master.sessions import Sessions
from taskfleet.master.store.base import Bus

log = logging.getLogger("taskfleet.master.cluster")

BEAT_S = 1.0
DEBOUNCE_S = 0.005  # changes within this long travel in one message of each kind
_MAX_MESSAGE_BYTES = 7_000  # PostgreSQL's limit on a notification is 8,000
_POLL_CHUNK = 10_000  # task ids per poll query
# A forwarded progress message is cut to this: the worker's own limit, and at
# most 4,000 bytes of UTF-8, so one update always fits a notification.
_MAX_PROGRESS_MESSAGE_CHARS = 1_000


def new_master(listen: str) -> MasterInfo:
    """This master as others see it: an id unique across hosts and restarts."""
    now = time.time()
    return MasterInfo(process_name(), socket.gethostname(), os.getpid(), listen, now, now)


class Cluster(LifecycleListener):
    """This master's link to the others sharing its store."""

    def __init__(
        self,
        bus: Bus,
        me: MasterInfo,
        *,
        hub: CompletionHub,
        sessions: Sessions,
        due: DueTimer,
        poll_only: bool,
        forget_after_s: float,
    ) -> None:
        self.me = me
        self._forget_after_s = max(forget_after_s, 5 * BEAT_S)
        self._bus = bus
        self._hub = hub
        self._sessions = sessions
        self._due = due
        self._poll_only = poll_only
        self._stop = threading.Event()
        self._pending = threading.Condition()
        self._queues: set[str] | None = set()  # None: every queue
        self._finished: list[str] = []
        self._progress: dict[str, Progress] = {}  # the latest per task, not yet sent
        self._revokes: list[tuple[str, str, int]] = []
        self._delayed = False
        # Until the first beat says otherwise there may be others to tell.
        self._peers = True
        self._masters = [me]
        self._remote_workers: list[WorkerInfo] = []
        self._beat_failed = False
        self._threads: list[threading.Thread] = []

    # -- what GetStats shows ----------------------------------------------------

    def masters(self) -> list[MasterInfo]:
        return list(self._masters)

    def remote_workers(self) -> list[WorkerInfo]:
        """The workers of the other masters, as of their last beat."""
        return list(self._remote_workers)

    # -- local changes, told to the others ---------------------------------------

    def submitted(self, tasks: Sequence[TaskSpec]) -> None:
        now = time.time()
        if any(spec.not_before > now for spec in tasks):
            self._add(lambda: setattr(self, "_delayed", True))

    def retried(self, tasks: Sequence[Task]) -> None:
        self._add(lambda: setattr(self, "_delayed", True))

    def work_available(
        self, queues: Collection[str] | None, names: Collection[str] | None, tasks: int | None
    ) -> None:
        def add() -> None:
            if queues is None:
                self._queues = None
            elif self._queues is not None:
                self._queues.update(queues)

        self._add(add)

    def finished(self, tasks: Sequence[Task]) -> None:
        self._add(lambda: self._finished.extend(t.id for t in tasks))

    def progressed(self, updates: Sequence[Progress]) -> None:
        self._add(lambda: self._progress.update((u.ref.task_id, u) for u in updates))

    def cancelled(self, task: Task) -> None:
        if task.worker_id and self._sessions.get(task.worker_id) is None:
            self._add(lambda: self._revokes.append((task.worker_id, task.id, task.lease)))

    def _add(self, change: Callable[[], None]) -> None:
        if not self._peers or self._poll_only:
            return
        with self._pending:
            change()
            self._pending.notify()

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        """Join the others (blocking: one beat), then beat, send and listen."""
        self._beat()
        loops: list[tuple[str, Callable[[], None]]] = [("cluster-beat", self._beat_loop)]
        if not self._poll_only:
            loops.append(("cluster-send", self._send_loop))
            loops.append(("cluster-listen", lambda: self._bus.listen(self._deliver, self._stop)))
        for name, loop in loops:
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop talking and leave, so the others forget this master at once."""
        self._stop.set()
        with self._pending:
            self._pending.notify()
        for thread in self._threads:
            thread.join()
        try:
            self._bus.leave(self.me.master_id)
        except Exception as exc:  # the others forget it soon anyway
            log.warning("could not leave the cluster: %s", exc)

    def _beat_loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._beat()
            if self._peers or self._poll_only:
                self._catch_up(wake_workers=False)

    def _beat(self) -> None:
        try:
            masters, workers = self._bus.beat(self.me, self._sessions.infos(), self._forget_after_s)
        except Exception as exc:
            if not self._beat_failed:
                log.warning("cannot reach the other masters through the store: %s", exc)
            self._beat_failed = True
            return
        if self._beat_failed:
            log.info("in touch with the other masters again")
        self._beat_failed = False
        self._masters = masters
        self._remote_workers = workers
        self._peers = any(m.master_id != self.me.master_id for m in masters)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._pending:
                while not self._has_pending() and not self._stop.is_set():
                    self._pending.wait()
            self._stop.wait(DEBOUNCE_S)  # let the rest of a burst join the message
            try:
                self._bus.notify(self._take_messages())
            except Exception as exc:  # the others poll for what they miss
                log.warning("cannot notify the other masters: %s", exc)

    def _has_pending(self) -> bool:
        return bool(
            self._queues is None
            or self._queues
            or self._finished
            or self._revokes
            or self._progress
            or self._delayed
        )

    def _take_messages(self) -> list[str]:
        with self._pending:
            queues, self._queues = self._queues, set()
            finished, self._finished = self._finished, []
            revokes, self._revokes = self._revokes, []
            progress, self._progress = self._progress, {}
            delayed, self._delayed = self._delayed, False
        messages: list[str] = []
        if queues is None:
            messages.append(self._message("w", None))
        elif queues:
            messages += self._messages("w", sorted(queues))
        if delayed:
            messages.append(self._message("d", None))
        # Ahead of the final tasks, so no update arrives after its task's end.
        messages += self._messages(
            "p",
            [
                (u.ref.task_id, u.ref.lease, u.fraction, u.message[:_MAX_PROGRESS_MESSAGE_CHARS])
                for u in progress.values()
            ],
        )
        messages += self._messages("f", finished)
        messages += self._messages("c", revokes)
        return messages

    def _messages(self, kind: str, items: Sequence[Any]) -> list[str]:
        """``items`` in as few messages as fit PostgreSQL's size limit."""
        messages: list[str] = []
        chunk: list[Any] = []
        size = 0
        for item in items:
            item_bytes = len(json.dumps(item)) + 2
            if chunk and size + item_bytes > _MAX_MESSAGE_BYTES:
                messages.append(self._message(kind, chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += item_bytes
        if chunk:
            messages.append(self._message(kind, chunk))
        return messages

    def _message(self, kind: str, data: Any) -> str:
        # Not ASCII-escaped: PostgreSQL counts bytes, and UTF-8 is never longer
        # than the escapes _messages measures.
        return json.dumps(
            [kind, self.me.master_id, data], separators=(",", ":"), ensure_ascii=False
        )

    # -- what the others tell this master ------------------------------------------

    def _deliver(self, message: str | None) -> None:
        try:
            if message is None:
                self._catch_up(wake_workers=True)
                return
            kind, sender, data = json.loads(message)
            if sender == self.me.master_id:
                return
            if kind == "w":
                self._sessions.work_available(data)
            elif kind == "d":
                self._due.reschedule()
            elif kind == "p":
                self._hub.publish_progress(
                    Progress(LeaseRef(task_id, lease), fraction, message)
                    for task_id, lease, fraction, message in data
                )
            elif kind == "f":
                self._publish(self._hub.waited(data))
            elif kind == "c":
                for worker_id, task_id, lease in data:
                    self._sessions.revoke(worker_id, [LeaseRef(task_id, lease)])
        except Exception:
            log.exception("cannot apply a message from another master: %.200s", message)

    def _catch_up(self, *, wake_workers: bool) -> None:
        """What polling finds: the final states of awaited tasks and the next
        delayed one; with ``wake_workers``, every idle worker looks too."""
        self._due.reschedule()
        if wake_workers:
            self._sessions.work_available(None)
        try:
            self._publish(self._hub.waited())
        except Exception as exc:
            log.warning("cannot poll for finished tasks: %s", exc)

    def _publish(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), _POLL_CHUNK):
            self._hub.publish(self._bus.finished(task_ids[start : start + _POLL_CHUNK]))
