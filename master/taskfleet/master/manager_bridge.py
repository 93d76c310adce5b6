"""The bridge between manager clients and the master's store.

A BaseManager client talks to the master over one connection per client
thread, and both of its proxies (task queue and result queue) share that
connection, so the server thread serving it stands for "this client". The
endpoint calls ``serve`` in that thread; the queue methods find the client's
``ClientConnection`` in a thread-local.

- A put on the task queue submits a task named ``--manager-task`` with the
  object as its one argument; its result comes back on the result queue.
- A get on the task queue leases one ``--manager-task`` task of
  ``--manager-queue`` to ``manager:<peer>`` for ``--manager-lease-s``; the
  client gets the task's single argument, or a dict with id, name, args and
  kwargs when the task has any other arguments.
- A put on the result queue records the result of the oldest task that
  connection holds; with none held, it is queued like a plain queue item.
- A connection that closes gives back the tasks it holds at once; one that
  stays silent past the lease loses them to the reaper, and its late result
  is then ignored (fencing).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from taskfleet.common.codec import decode_args, encode_args, encode_result
from taskfleet.common.errors import InvalidArgument, TaskfleetError
from taskfleet.common.model import (
    LeaseRef,
    Outcome,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    WorkerInfo,
)
from taskfleet.common.result_limit import limit_outcome
from taskfleet.master.manager_results import ResultFeed
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.sessions import WorkerSession

log = logging.getLogger("taskfleet.master.manager")

RECHECK_S = 1.0  # a blocked get rechecks the store and the client this often
_NOTHING = object()


class Wakeup:
    """A counter that blocked gets wait on, so a ring between a look at the store
    and the wait is never missed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0

    def ring(self) -> None:
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def seq(self) -> int:
        with self._cond:
            return self._seq

    def wait(self, seen: int, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._seq != seen, timeout_s)


class ManagerSession(WorkerSession):
    """A manager connection that takes tasks, as GetStats lists it and as
    ``Sessions.work_available`` wakes it."""

    def __init__(self, info: WorkerInfo, wakeup: Wakeup) -> None:
        super().__init__(info)
        self._wakeup = wakeup

    def hint_work(self) -> None:
        self._wakeup.ring()

    def close(self) -> None:
        super().close()
        self._wakeup.ring()

    def send(self, message: Any) -> None:
        # Only revokes come this way; the store already ignores a revoked task's result.
        pass


@dataclass(eq=False)
class ClientConnection:
    """One manager client connection (one thread of a client process)."""

    peer: str
    channel: Connection[Any, Any]
    held: deque[LeaseRef] = field(default_factory=deque)  # taken, result not yet put
    session: ManagerSession | None = None

    @property
    def worker_id(self) -> str:
        return f"manager:{self.peer}"

    def gone(self) -> bool:
        """True once the client hung up: it never sends while it awaits a reply,
        so a readable connection means end of file."""
        try:
            return self.channel.poll(0)
        except (OSError, ValueError):
            return True


class ManagerBridge:
    """Puts, gets and results of manager clients, turned into store operations."""

    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime
        config = runtime.config
        self.task_name = config.manager_task
        self.queue = config.manager_queue
        self.lease_s = config.manager_lease_s
        self.results = ResultFeed(runtime.hub, runtime.store)
        self._wakeup = Wakeup()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: set[ClientConnection] = set()

    def start(self) -> None:
        self.results.start()

    def close(self) -> None:
        """Give back every task manager clients hold and stop the result feed."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            self._hang_up(client)
        self.results.close()

    # -- connections ---------------------------------------------------------

    def serve(
        self, channel: Connection[Any, Any], peer: str, handle: Callable[[Any], None]
    ) -> None:
        """Run ``handle(channel)`` in this thread as the connection of client ``peer``."""
        client = ClientConnection(peer, channel)
        self._local.client = client
        with self._lock:
            self._clients.add(client)
        try:
            handle(channel)
        finally:
            self._local.client = None
            with self._lock:
                self._clients.discard(client)
            self._hang_up(client)

    def _current(self) -> ClientConnection:
        client: ClientConnection | None = getattr(self._local, "client", None)
        if client is None:
            raise RuntimeError("manager queues are only usable from a client connection")
        return client

    def _hang_up(self, client: ClientConnection) -> None:
        with self._lock:
            refs = list(client.held)
            client.held.clear()
            session, client.session = client.session, None
        if session is not None:
            self._rt.sessions.remove(session)
        if refs:
            released = self._rt.lifecycle.release(refs)
            log.info("manager client %s left: %d task(s) back to the queue", client.peer, released)

    def _check_alive(self, client: ClientConnection) -> None:
        if self._rt.stopping.is_set():
            raise ConnectionAbortedError("the taskfleet master is shutting down")
        if client.gone():
            raise ConnectionAbortedError(f"manager client {client.peer} went away")

    # -- the task queue ------------------------------------------------------

    def submit(self, item: Any) -> str:
        """Enqueue a ``--manager-task`` task with ``item`` as its one argument."""
        client = self._current()
        try:
            payload = encode_args([item], {})
        except InvalidArgument as exc:
            # A builtin exception: the client may not have taskfleet installed.
            raise TypeError(
                f"taskfleet: {exc}; items put on the task queue become tasks with JSON "
                "arguments, so put numbers, strings, lists or dicts"
            ) from None
        spec = TaskSpec(
            name=self.task_name,
            queue=self.queue,
            payload=payload,
            metadata={"manager_peer": client.peer},
        )
        try:
            (task_id,) = self._rt.lifecycle.submit([spec])
        except TaskfleetError as exc:
            raise ValueError(f"taskfleet: {exc}") from None
        self.results.watch(task_id)
        return task_id

    def take(self, block: bool, timeout: float | None) -> Any:
        """Lease one task to this connection, waiting as ``queue.Queue.get`` would."""
        client = self._current()
        deadline = _deadline(block, timeout)
        self._register(client)
        while True:
            seen = self._wakeup.seq()
            item = self._lease_one(client)
            if item is not _NOTHING:
                return item
            remaining_s = _remaining_s(deadline)
            if remaining_s <= 0:
                raise queue.Empty
            self._check_alive(client)
            self._wakeup.wait(seen, min(remaining_s, self._idle_wait_s()))

    def pending(self) -> int:
        """PENDING tasks of the manager queue (any name), like ``qsize``: approximate."""
        for counts in self._rt.store.stats():
            if counts.queue == self.queue:
                return counts.counts.get(TaskState.PENDING, 0)
        return 0

    def _register(self, client: ClientConnection) -> None:
        """List a connection that takes tasks among the workers, woken by new work."""
        if client.session is not None:
            return
        host = client.peer.rpartition(":")[0]
        info = WorkerInfo(
            worker_id=client.worker_id,
            hostname=host.strip("[]"),
            pid=0,
            queues=(self.queue,),
            task_names=(self.task_name,),
            concurrency=1,
            running=0,
            peer=client.peer,
            connected_at=time.time(),
        )
        client.session = ManagerSession(info, self._wakeup)
        self._rt.sessions.add(client.session)

    def _lease_one(self, client: ClientConnection) -> Any:
        while not self._rt.stopping.is_set():
            leases = self._rt.lifecycle.lease(
                client.worker_id, [self.queue], [self.task_name], 1, self.lease_s
            )
            if not leases:
                return _NOTHING
            task = leases[0].task
            try:
                item = _argument(task)
            except InvalidArgument as exc:
                self._finish(Outcome(leases[0].ref, TaskState.FAILED, error=_error(exc)))
                continue
            with self._lock:
                client.held.append(leases[0].ref)
            self._count_running(client)
            return item
        return _NOTHING

    def _idle_wait_s(self) -> float:
        now = time.time()
        ready_at = self._rt.store.next_ready_at(now)
        if ready_at is None:
            return RECHECK_S
        return max(0.001, min(RECHECK_S, ready_at - now))

    # -- the result queue ----------------------------------------------------

    def give_result(self, item: Any) -> None:
        """Record ``item`` as the result of the oldest task this connection holds,
        or queue it as a plain item when it holds none."""
        client = self._current()
        with self._lock:
            ref = client.held.popleft() if client.held else None
        if ref is None:
            self.results.put(item)
            return
        self._count_running(client)
        try:
            outcome = Outcome(ref, TaskState.SUCCEEDED, result=encode_result(item))
        except (TypeError, ValueError) as exc:
            error = TaskError("ResultNotSerializable", f"the result put is not JSON: {exc}")
            outcome = Outcome(ref, TaskState.FAILED, error=error)
        self._finish(outcome)

    def take_result(self, block: bool, timeout: float | None) -> Any:
        """The oldest result, waiting as ``queue.Queue.get`` would."""
        client = self._current()
        deadline = _deadline(block, timeout)
        while True:
            remaining_s = _remaining_s(deadline)
            try:
                return self.results.get(min(remaining_s, RECHECK_S))
            except queue.Empty:
                if _remaining_s(deadline) <= 0:
                    raise
            self._check_alive(client)

    def _finish(self, outcome: Outcome) -> None:
        self._rt.lifecycle.record([limit_outcome(outcome, self._rt.config.max_result_bytes)])

    def _count_running(self, client: ClientConnection) -> None:
        session = client.session
        if session is not None:
            session.running = len(client.held)


def _argument(task: Task) -> Any:
    args, kwargs = decode_args(task.spec.payload, task.spec.content_type)
    if len(args) == 1 and not kwargs:
        return args[0]
    return {"id": task.id, "name": task.spec.name, "args": args, "kwargs": kwargs}


def _error(exc: InvalidArgument) -> TaskError:
    return TaskError("InvalidPayload", str(exc))


def _deadline(block: bool, timeout: float | None) -> float | None:
    """``queue.Queue``'s rules for ``block`` and ``timeout`` as a monotonic deadline
    (None: wait forever)."""
    if not block:
        return time.monotonic()
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + timeout


def _remaining_s(deadline: float | None) -> float:
    return RECHECK_S if deadline is None else deadline - time.monotonic()
