"""``taskfleet worker --transport manager``: serve a plain multiprocessing.managers
master, such as the classic ``task_master.py``.

Two threads, each with a connection of its own: ``fetch`` takes an item from
the manager's task queue whenever a pool slot is free and runs task
``--manager-task`` on it; ``send`` puts each return value on the result queue
(a task that fails puts a RuntimeError saying why). Both reconnect with
the one reconnect policy (common/reconnect.py) when the manager goes away and comes
back; results not yet put wait for the new connection.

A plain manager queue has no acknowledgements: an item taken is gone from the
manager. So an item taken while draining still runs and reports, and an item
held by a worker that is killed is lost; that is what the taskfleet master adds.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import tenacity

from taskfleet.common.addresses import host_port
from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.config import WorkerConfig
from taskfleet.common.errors import ConfigError, InvalidArgument
from taskfleet.common.identity import process_name
from taskfleet.common.model import JSON, LeaseRef
from taskfleet.common.reconnect import reconnect_policy
from taskfleet.common.shutdown import EXIT_GRACE_EXPIRED, on_stop_signals
from taskfleet.worker.execute import Job, JobResult
from taskfleet.worker.manager_link import ManagerLink, ManagerRefused
from taskfleet.worker.pool import Pool, abandon_broken
from taskfleet.worker.pools import make_pool
from taskfleet.worker.registry import TaskDefinition

log = logging.getLogger("taskfleet.worker.manager")

EXIT_REFUSED = 2  # the manager refused the authkey or does not serve the two queues
FETCH_WAIT_S = 1.0  # how long one get waits on the manager; bounds how long a drain waits
PUT_WAIT_S = 10.0  # how long one put waits for room in a bounded result queue
SLOT_RECHECK_S = 1.0  # a thread pool may free a slot without calling on_done
POOL_CHECK_S = 0.5  # how soon a broken pool is noticed
MANAGER_QUEUE = "manager"  # what current_task().queue says for items from a manager


class LinkLost(Exception):
    """A connection that was up failed; the loop reconnects from a fresh backoff."""


class ManagerTransport:
    """One worker serving a BaseManager's get_task_queue / get_result_queue."""

    def __init__(self, config: WorkerConfig, registry: dict[str, TaskDefinition]) -> None:
        definition = registry.get(config.manager_task)
        if definition is None:
            raise ConfigError(
                f"--manager-task: {config.manager_task!r} is not registered by "
                f"--tasks {','.join(config.tasks)}; registered: {', '.join(sorted(registry))}"
            )
        self.config = config
        self.definition = definition
        self.address = host_port(config.master)
        self.worker_id = process_name()
        self.pool: Pool = make_pool(config.pool, config.slots, config.tasks, self._on_done)
        self._authkey = config.authkey.encode()
        self._lock = threading.Condition()
        self._running: dict[LeaseRef, Job] = {}
        self._unsent: deque[Any] = deque()  # results not yet put, oldest first
        self._numbers = itertools.count(1)
        self._stop_requested = threading.Event()
        self._exit_code = 0
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self._fetcher = threading.Thread(target=self._fetch_forever, name="fetch", daemon=True)
        self._sender = threading.Thread(target=self._send_forever, name="send", daemon=True)

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or a refusal), then drain; returns the exit code."""
        self.pool.start()
        self._fetcher.start()
        self._sender.start()

        on_stop_signals(self._stop_requested, log, "draining")
        print(f"taskfleet worker {self.worker_id} serving manager {self.config.master}", flush=True)
        while not self._stop_requested.wait(POOL_CHECK_S):
            if self.pool.failure is not None:
                self.stopped.set()
                return abandon_broken(self.pool)
        return self.drain()

    def drain(self) -> int:
        """Take no new items, let running ones finish and their results be put within
        the grace period, then stop."""
        self.draining.set()
        deadline = time.monotonic() + self.config.grace_s
        # Once fetch has left its loop, no item can arrive behind our back.
        self._fetcher.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            settled = self._lock.wait_for(
                lambda: not (self._running or self._unsent),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        if settled:
            log.info("drained: every item finished and its result was put")
        else:
            log.warning("grace period over with results not put; they are lost")
        self.stopped.set()
        with self._lock:
            self._lock.notify_all()
        self.pool.close(wait=False)
        return self._exit_code or (0 if settled else EXIT_GRACE_EXPIRED)

    def _refused(self, exc: BaseException) -> None:
        if isinstance(exc, multiprocessing.AuthenticationError):
            log.error("the manager at %s rejected --authkey (%s)", self.config.master, exc)
        else:
            log.error("the manager at %s refused: %s", self.config.master, exc)
        self._exit_code = EXIT_REFUSED
        self._stop_requested.set()

    def _retrying(self, what: str, done: threading.Event) -> tenacity.Retrying:
        return reconnect_policy(
            lambda exc: isinstance(exc, OSError | EOFError),
            lambda exc: log.warning(
                "manager %s unreachable for the %s (%s); retrying",
                self.config.master,
                what,
                _reason(exc),
            ),
            done,
        )

    def _serve_forever(self, what: str, session: Callable[[], None], done: threading.Event) -> None:
        while not done.is_set():
            try:
                self._retrying(what, done)(session)
            except LinkLost as exc:
                if not done.is_set():
                    log.warning("connection to manager lost (%s); reconnecting", exc)
            except (OSError, EOFError):
                pass  # retries stopped: we are done
            except (multiprocessing.AuthenticationError, ManagerRefused) as exc:
                self._refused(exc)
                return

    # -- fetching ------------------------------------------------------------

    def _fetch_forever(self) -> None:
        self._serve_forever("task queue", self._fetch_session, self.draining)

    def _fetch_session(self) -> None:
        with ManagerLink(self.address, self._authkey, "get_task_queue") as tasks:
            log.info("connected to manager %s", self.config.master)
            try:
                while self._wait_for_slot():
                    try:
                        item = tasks.get(FETCH_WAIT_S)
                    except queue.Empty:
                        continue
                    self._start(item)
            except (OSError, EOFError) as exc:
                raise LinkLost(_reason(exc)) from None

    def _wait_for_slot(self) -> bool:
        with self._lock:
            while not self._lock.wait_for(
                lambda: self.draining.is_set() or self.pool.free_slots() > 0, SLOT_RECHECK_S
            ):
                pass
            return not self.draining.is_set()

    def _start(self, item: Any) -> None:
        try:
            payload = encode_args([item], {})
        except InvalidArgument as exc:
            self._put_later([RuntimeError(f"taskfleet: cannot run {self.definition.name}: {exc}")])
            return
        timeout_s = self.definition.timeout_s
        job = Job(
            ref=LeaseRef(f"{self.worker_id}-{next(self._numbers)}", 1),
            name=self.definition.name,
            queue=MANAGER_QUEUE,
            attempt=1,
            payload=payload,
            content_type=JSON,
            timeout_s=timeout_s,
            deadline=time.time() + timeout_s if timeout_s else None,
            metadata={},
        )
        with self._lock:
            self._running[job.ref] = job
            self.pool.submit([job])

    def _on_done(self, results: list[JobResult]) -> None:
        with self._lock:
            done = [(self._running.pop(result.ref, None), result) for result in results]
        self._put_later([_result_value(job, result) for job, result in done if job is not None])

    # -- sending -------------------------------------------------------------

    def _put_later(self, values: list[Any]) -> None:
        with self._lock:
            self._unsent.extend(values)
            self._lock.notify_all()

    def _send_forever(self) -> None:
        self._serve_forever("result queue", self._send_session, self.stopped)

    def _send_session(self) -> None:
        if not self._wait_for_unsent():
            return  # connect only once there is something to put
        with ManagerLink(self.address, self._authkey, "get_result_queue") as results:
            try:
                while self._wait_for_unsent():
                    with self._lock:
                        value = self._unsent[0]
                    try:
                        results.put(value, PUT_WAIT_S)
                    except queue.Full:
                        continue
                    with self._lock:
                        self._unsent.popleft()
                        self._lock.notify_all()
            except (OSError, EOFError) as exc:
                raise LinkLost(_reason(exc)) from None

    def _wait_for_unsent(self) -> bool:
        with self._lock:
            self._lock.wait_for(lambda: self.stopped.is_set() or bool(self._unsent))
            return not self.stopped.is_set()


def _result_value(job: Job, result: JobResult) -> Any:
    """What goes on the result queue: the return value, or a RuntimeError saying why
    the task failed (a builtin exception, so the manager can unpickle it)."""
    if result.ok:
        return decode_result(result.result, JSON)
    error = result.error
    why = f"{error.type}: {error.message}" if error else "no error recorded"
    return RuntimeError(f"taskfleet task {job.name} failed: {why}")


def _reason(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
