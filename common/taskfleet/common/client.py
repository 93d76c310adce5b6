"""The Python client: what the CLI uses and any Python service can use.

    with Client("127.0.0.1:50051") as client:
        task_id = client.submit("square", [7])
        print(client.result(task_id, timeout_s=10))   # 49

Failures come back as taskfleet's own exceptions (``NotFound``,
``InvalidArgument``, ``TaskFailed``, ...), never as raw gRPC errors.

``Client("10.0.0.1:50051,10.0.0.2:50051")`` fails over between masters that
share one store: a call that finds its master unavailable goes on to the next.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import tenacity

from taskfleet.common import convert
from taskfleet.common.addresses import AddressRing, parse_address_list
from taskfleet.common.backoff import backoff_s
from taskfleet.common.batching import MAX_ITEM_BYTES, cut, spec_bytes
from taskfleet.common.calls import make_spec as make_spec  # re-exported: its old home
from taskfleet.common.calls import task_result as task_result
from taskfleet.common.channel import FailoverChannel, Link
from taskfleet.common.config import DEFAULT_MASTER
from taskfleet.common.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from taskfleet.common.handle import TaskHandle
from taskfleet.common.mapping import Named, imap, imap_unordered
from taskfleet.common.model import (
    DEFAULT_QUEUE,
    MissedTicks,
    Schedule,
    Stats,
    Task,
    TaskSpec,
    TaskState,
)
from taskfleet.common.tls import client_tls
from taskfleet.common.waits import (
    RESUMABLE,
    RETRY_UNAVAILABLE_S,
    WAIT_CHUNK,
    OnProgress,
    Resumption,
    report_progress,
    take_final,
    wait_request,
)
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

T = TypeVar("T")
SUBMIT_BATCH = 1_000
CALL_TIMEOUT_S = 30.0


class _TryNext(Exception):
    """A call found its master unavailable and may be sent again, to the next one."""

    def __init__(self, error: Unavailable) -> None:
        self.error = error


def _retry_unavailable() -> tenacity.Retrying:
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_TryNext),
        wait=lambda state: backoff_s(state.attempt_number, base_s=0.1, cap_s=2.0),
        stop=tenacity.stop_after_delay(RETRY_UNAVAILABLE_S),
        reraise=True,
    )


def never_sent(exc: grpc.RpcError) -> bool:
    """Whether a call failed before it reached any master (gRPC could not connect),
    so sending it again cannot repeat what it did."""
    return str(from_rpc_error(exc)).startswith("failed to connect")


class Client:
    """A connection to a master, or to one of a list that fails over. Thread-safe;
    close it (or use ``with``) when done.

    ``master`` is ``HOST:PORT`` or ``HOST:PORT,HOST:PORT,...``: masters sharing
    one store. The client uses one at a time; a call that finds it unavailable
    moves on to the next, round-robin, and is sent again there when that is
    safe: reads and waits always, a submit only when every task in it has an
    idempotency key, and any call that never reached a master. A bad address
    raises ``ConfigError``.

    ``token`` is sent as ``authorization: Bearer <token>``. ``tls_ca`` (a PEM file)
    connects over TLS, trusting that CA; ``tls_cert`` and ``tls_key`` add a client
    certificate for a master that requires one. A bad file raises ``ConfigError``.
    """

    def __init__(
        self,
        master: str = DEFAULT_MASTER,
        *,
        token: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        masters = AddressRing(parse_address_list("master", master))
        tls = client_tls(tls_ca, tls_cert, tls_key)
        self._channel = FailoverChannel(masters, tasks_pb2_grpc.TaskServiceStub, token, tls=tls)
        # Whether the master has ever answered: a wait then resumes for longer,
        # since the master is more likely restarting than at a wrong address.
        self._reached = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def masters(self) -> AddressRing:
        """The masters this client uses, and the current one."""
        return self._channel.masters

    # -- producing -----------------------------------------------------------

    def submit(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = 0,
        timeout_s: float = 0.0,
        not_before: float | dt.datetime | None = None,
        idempotency_key: str = "",
        metadata: Mapping[str, str] | None = None,
        expires_at: float | dt.datetime | None = None,
        concurrency_key: str = "",
        concurrency_limit: int | None = None,
    ) -> TaskHandle[Any]:
        """Enqueue ``name(*args, **kwargs)``; returns its handle, which is the task
        id (a ``str``) with ``result``, ``get``, ``state`` and ``cancel``. The
        options are ``make_spec``'s."""
        spec = make_spec(
            name,
            args,
            kwargs,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            not_before=not_before,
            idempotency_key=idempotency_key,
            metadata=metadata,
            expires_at=expires_at,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
        )
        return TaskHandle(self.submit_many([spec])[0], self)

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[str]:
        """Enqueue many tasks, in batches cut by count and bytes; returns their ids
        in order. A failed batch raises; the batches before it stay submitted.

        A batch cut off on UNAVAILABLE is sent again (to the next master of a list)
        only when every task in it has an idempotency key, or when it never
        reached a master, so a retry can never create duplicates.
        """
        return [task_id for batch_ids in self.submit_batches(specs) for task_id in batch_ids]

    def submit_workflow(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs`` in ONE Submit, all or none, so ``$N`` in their
        ``depends_on`` names the Nth of them (see taskfleet.client.canvas)."""
        return self._submit_batch(list(specs))

    def submit_batches(self, specs: Iterable[TaskSpec]) -> Iterator[list[str]]:
        """``submit_many`` one batch at a time: yields the ids of each batch as soon
        as the master has stored it, so a caller can record them before the next
        batch (which may fail) is sent. Batches are consecutive, cut by count and
        by bytes: an error names ``tasks[i]`` counted from the first task not yet
        yielded. A spec no master would take is refused before any batch is sent."""
        specs = list(specs)
        sizes = [spec_bytes(spec) for spec in specs]  # once each: the cut reads them too
        for i, size in enumerate(sizes):
            if size > MAX_ITEM_BYTES:
                raise ResourceExhausted(
                    f"specs[{i}].payload: {size} bytes with its metadata, over "
                    f"any master's limit of {MAX_ITEM_BYTES}; put large data on shared "
                    "storage and pass its path or URL instead"
                )
        for batch in cut(range(len(specs)), sizes.__getitem__, max_count=SUBMIT_BATCH):
            yield self._submit_batch([specs[i] for i in batch])

    def _submit_batch(self, batch: list[TaskSpec]) -> list[str]:
        request = tasks_pb2.SubmitRequest(tasks=[convert.spec_to_proto(s) for s in batch])
        keyed = all(s.idempotency_key for s in batch)
        return list(self._call("Submit", request, repeatable=keyed).task_ids)

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """The task as the master has it now."""
        pb = self._call("GetTask", tasks_pb2.GetTaskRequest(task_id=task_id))
        return convert.task_from_proto(pb)

    def wait(
        self,
        task_ids: Sequence[str],
        timeout_s: float | None = None,
        *,
        on_progress: OnProgress | None = None,
    ) -> Iterator[Task]:
        """Yield each task as it reaches a final state; stops when all are final or
        ``timeout_s`` passes (then only the tasks final by then come back).

        ``on_progress`` is called with a ``TaskProgress`` for each progress update
        of an awaited task while it runs (at once for one running already; at
        most a few per second per task), never after that task came back.

        The wait survives a restart of the master: it is asked again, with
        backoff, for the tasks not yet final. Raises ``Unavailable`` if the
        master stays unreachable for ``RESUME_WAIT_S`` or up to the deadline, so
        a short answer always means the timeout passed. More than ``WAIT_CHUNK``
        ids are waited for in chunks, one after the other.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        distinct = list(dict.fromkeys(task_ids))
        for start in range(0, len(distinct), WAIT_CHUNK):
            chunk = distinct[start : start + WAIT_CHUNK]
            yield from self._wait_chunk(chunk, deadline, on_progress)

    def _wait_chunk(
        self, task_ids: list[str], deadline: float | None, on_progress: OnProgress | None
    ) -> Iterator[Task]:
        """Wait for at most WAIT_CHUNK tasks, resuming after a lost stream."""
        waiting = dict.fromkeys(task_ids)  # ordered, for the request
        resumption = Resumption(deadline)
        while waiting:
            with self._channel.use() as link:
                stream = link.stub.WaitTasksBatched(wait_request(waiting, deadline, on_progress))
                try:
                    for batch in stream:
                        resumption.heard()
                        self._reached = True
                        report_progress(batch.progress, waiting, on_progress)
                        yield from take_final(batch, waiting)
                    if not waiting or (deadline is not None and time.monotonic() >= deadline):
                        return  # all final, or the master's timeout (it starts after ours)
                    cause, self._reached = "the master ended the wait early", True
                except grpc.RpcError as exc:
                    if exc.code() not in RESUMABLE:
                        raise from_rpc_error(exc) from None
                    cause = str(from_rpc_error(exc))
                    self._reached |= not never_sent(exc)
                finally:
                    stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
                # Stopping or gone: the wait resumes on the next master, if there is one.
                self._channel.move_on(link)
            time.sleep(resumption.pause_s(cause, len(waiting), reached=self._reached))

    def result(
        self,
        task_id: str,
        timeout_s: float | None = None,
        *,
        on_progress: OnProgress | None = None,
    ) -> Any:
        """Wait for one task and return its decoded result, calling ``on_progress``
        with its progress meanwhile, as ``wait`` does.

        Raises ``TaskFailed`` if it ended FAILED or CANCELLED, ``DeadlineExceeded``
        if it is not final within ``timeout_s``, and ``Unavailable`` if the master
        could not be reached for long enough to tell (see ``wait``).
        """
        for task in self.wait([task_id], timeout_s, on_progress=on_progress):
            return task_result(task)
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    def run(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        on_progress: OnProgress | None = None,
        **options: Any,
    ) -> Any:
        """Submit ``name(*args, **kwargs)`` and return its decoded result: ``submit``
        then ``result`` in one round trip (SubmitAndWait). ``options`` are
        ``submit``'s keyword arguments; ``on_progress`` is ``wait``'s.

        Raises ``TaskFailed`` if it ended FAILED or CANCELLED,
        ``DeadlineExceeded`` if it is not final within ``timeout_s`` (it stays
        queued; its id is in the message), and ``Unavailable`` if the master was
        lost before it said it stored the task, unless the spec has an
        idempotency key (then it is sent again, as ``submit_many`` does).
        """
        spec = make_spec(name, args, kwargs, **options)
        request = tasks_pb2.SubmitAndWaitRequest(tasks=[convert.spec_to_proto(spec)])
        if on_progress is not None:
            request.progress = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if timeout_s is not None:
            request.timeout.CopyFrom(convert.duration(timeout_s))
        task_id, task = self._on_master(
            lambda link: self._submit_and_wait(link, request, on_progress),
            repeatable=bool(spec.idempotency_key),
        )
        if task is not None:
            return task_result(task)
        if deadline is None or time.monotonic() < deadline:
            # Submitted, but the stream ended early (a restart): wait for it instead.
            left_s = None if deadline is None else deadline - time.monotonic()
            return self.result(task_id, left_s, on_progress=on_progress)
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    def _submit_and_wait(
        self,
        link: Link[tasks_pb2_grpc.TaskServiceStub],
        request: tasks_pb2.SubmitAndWaitRequest,
        on_progress: OnProgress | None,
    ) -> tuple[str, Task | None]:
        """One SubmitAndWait: the task id and the final task, or None if the stream
        ended once the task was stored. Raises RpcError if it was not."""
        task_id = ""
        try:
            for response in link.stub.SubmitAndWait(request):
                task_id = task_id or response.task_ids[0]
                self._reached = True
                report_progress(response.progress, (task_id,), on_progress)
                for pb in response.tasks:
                    return task_id, convert.task_from_proto(pb)
        except grpc.RpcError as exc:
            if not task_id or exc.code() not in RESUMABLE:
                raise
            self._channel.move_on(link)  # the wait resumes on the next master
        if not task_id:
            raise DeadlineExceeded("the master ended SubmitAndWait before storing the task")
        return task_id, None

    def cancel(self, task_id: str) -> Task:
        """Cancel a PENDING or RUNNING task; returns it as it is now."""
        pb = self._call(
            "CancelTask", tasks_pb2.CancelTaskRequest(task_id=task_id), repeatable=False
        )
        return convert.task_from_proto(pb)

    def map(self, task: str | Named, items: Iterable[Any]) -> list[Any]:
        """``task(item)`` for each item, results in the items' order, as
        ``multiprocessing.Pool.map``; the first failure raises ``TaskFailed``
        naming the item. Submitted a window at a time (see mapping.py)."""
        return list(imap(self, task, items))

    def imap(self, task: str | Named, items: Iterable[Any]) -> Iterator[Any]:
        """``map``, lazily: results in order as they can be given."""
        return imap(self, task, items)

    def imap_unordered(self, task: str | Named, items: Iterable[Any]) -> Iterator[Any]:
        """``task(item)`` for each item, results as they finish."""
        return imap_unordered(self, task, items)

    def stats(self, *, pending_names: bool = False) -> Stats:
        """Counts per queue and state, the connected workers and the masters; with
        ``pending_names``, the pending tasks per queue and name (a scan of them
        in the store), which ``Stats.unserved()`` reads."""
        request = tasks_pb2.GetStatsRequest(pending_names=pending_names)
        pb = self._call("GetStats", request)
        return convert.stats_from_proto(pb)

    # -- operating -----------------------------------------------------------

    def list_tasks(
        self,
        *,
        queue: str = "",
        name: str = "",
        states: Iterable[TaskState] = (),
        page_size: int = 0,
    ) -> Iterator[Task]:
        """Tasks newest first, filtered (an empty filter matches all), fetched a page
        at a time as the iteration goes on."""
        request = tasks_pb2.ListTasksRequest(
            queue=queue,
            name=name,
            states=[int(s) for s in states],  # type: ignore[misc]
            page_size=page_size,
        )
        while True:
            page = self._call("ListTasks", request)
            for pb in page.tasks:
                yield convert.task_from_proto(pb)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def retry(self, task_id: str) -> Task:
        """Run a FAILED or CANCELLED task again, with a fresh attempt budget."""
        pb = self._call("RetryTask", tasks_pb2.RetryTaskRequest(task_id=task_id), repeatable=False)
        return convert.task_from_proto(pb)

    def purge(self, *, queue: str = "", states: Iterable[TaskState] = ()) -> int:
        """Delete finished tasks of ``queue`` (every queue when empty) in ``states``
        (every final state when empty); returns how many."""
        request = tasks_pb2.PurgeTasksRequest(queue=queue, states=[int(s) for s in states])  # type: ignore[misc]
        return int(self._call("PurgeTasks", request, repeatable=False).count)

    # -- schedules -----------------------------------------------------------

    def create_schedule(
        self,
        spec: TaskSpec,
        *,
        cron: str = "",
        interval_s: float = 0.0,
        timezone: str = "UTC",
        missed: MissedTicks = MissedTicks.FIRE_ONCE,
    ) -> Schedule:
        """Submit ``spec`` on each tick of ``cron`` (read in ``timezone``) or every
        ``interval_s``; returns the schedule with its id and first tick. Not sent
        again after a master was lost mid-call: that could create a second schedule."""
        schedule = Schedule("", spec, cron, interval_s, timezone, missed=missed)
        request = tasks_pb2.CreateScheduleRequest(schedule=convert.schedule_to_proto(schedule))
        response = self._call("CreateSchedule", request, repeatable=False)
        return convert.schedule_from_proto(response)

    def schedules(self) -> list[Schedule]:
        """Every schedule, oldest first."""
        response = self._call("ListSchedules", tasks_pb2.ListSchedulesRequest())
        return [convert.schedule_from_proto(pb) for pb in response.schedules]

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule; the tasks it fired are left alone."""
        request = tasks_pb2.DeleteScheduleRequest(id=schedule_id)
        self._call("DeleteSchedule", request, repeatable=False)

    def pause_schedule(self, schedule_id: str) -> Schedule:
        """Stop a schedule firing until it is resumed."""
        request = tasks_pb2.PauseScheduleRequest(id=schedule_id)
        return convert.schedule_from_proto(self._call("PauseSchedule", request))

    def resume_schedule(self, schedule_id: str) -> Schedule:
        """Let a paused schedule fire again, from its next tick after now."""
        request = tasks_pb2.ResumeScheduleRequest(id=schedule_id)
        return convert.schedule_from_proto(self._call("ResumeSchedule", request))

    def _call(self, method: str, request: Any, *, repeatable: bool = True) -> Any:
        """The unary call ``method`` on the current master (see ``_on_master``)."""

        def call(link: Link[tasks_pb2_grpc.TaskServiceStub]) -> Any:
            response = getattr(link.stub, method)(request, timeout=CALL_TIMEOUT_S)
            self._reached = True
            return response

        return self._on_master(call, repeatable=repeatable)

    def _on_master(
        self, call: Callable[[Link[tasks_pb2_grpc.TaskServiceStub]], T], *, repeatable: bool
    ) -> T:
        """``call`` on the current master. When it finds that master unavailable, the
        next master becomes current, and ``call`` is made again there (with backoff,
        for RETRY_UNAVAILABLE_S) if it is ``repeatable`` or never reached a master;
        otherwise it may have done its work, and ``Unavailable`` says so."""

        def once() -> T:
            with self._channel.use() as link:
                try:
                    return call(link)
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                    if not isinstance(error, Unavailable):
                        raise error from None
                    self._channel.move_on(link)
                    if repeatable or never_sent(exc):
                        raise _TryNext(error) from None
                    raise error from None

        try:
            return _retry_unavailable()(once)
        except _TryNext as exc:
            raise exc.error from None
