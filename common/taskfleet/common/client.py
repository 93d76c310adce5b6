"""The Python client: what the CLI uses and any Python service can use.

    with Client("127.0.0.1:50051") as client:
        task_id = client.submit("square", [7])
        print(client.result(task_id, timeout_s=10))   # 49

Failures come back as taskfleet's own exceptions (``NotFound``,
``InvalidArgument``, ``TaskFailed``, ...), never as raw gRPC errors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import tenacity

from taskfleet.common import convert
from taskfleet.common.backoff import backoff_s
from taskfleet.common.batching import MAX_ITEM_BYTES, cut, spec_bytes
from taskfleet.common.channel import open_channel
from taskfleet.common.codec import decode_result, encode_args
from taskfleet.common.config import DEFAULT_MASTER
from taskfleet.common.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    TaskFailed,
    Unavailable,
    from_rpc_error,
)
from taskfleet.common.model import DEFAULT_QUEUE, JSON, Stats, Task, TaskSpec, TaskState
from taskfleet.common.tls import client_tls
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

SUBMIT_BATCH = 1_000
CALL_TIMEOUT_S = 30.0
# How long a call is retried on UNAVAILABLE. By time, not by count: after a
# failed connect gRPC waits about 1 s (then 1.6 s, ...) before it dials again,
# and fails calls at once meanwhile, so a few quick retries would all fail
# before the channel even tried to reconnect.
RETRY_UNAVAILABLE_S = 5.0


def _retry_unavailable() -> tenacity.Retrying:
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Unavailable),
        wait=lambda state: backoff_s(state.attempt_number, base_s=0.1, cap_s=2.0),
        stop=tenacity.stop_after_delay(RETRY_UNAVAILABLE_S),
        reraise=True,
    )


class Client:
    """A connection to one master. Thread-safe; close it (or use ``with``) when done.

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
        tls = client_tls(tls_ca, tls_cert, tls_key)
        self._channel = open_channel(master, token, tls=tls)
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

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
    ) -> str:
        """Enqueue ``name(*args, **kwargs)``; returns the task id."""
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
        )
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[str]:
        """Enqueue many tasks, in batches cut by count and bytes; returns their ids
        in order. A failed batch raises; the batches before it stay submitted.

        A batch is retried on UNAVAILABLE only when every task in it has an
        idempotency key, so a retry can never create duplicates.
        """
        specs = list(specs)
        for i, spec in enumerate(specs):
            # No master takes one this large: refuse before any batch is sent.
            if spec_bytes(spec) > MAX_ITEM_BYTES:
                raise ResourceExhausted(
                    f"specs[{i}].payload: {spec_bytes(spec)} bytes with its metadata, over "
                    f"any master's limit of {MAX_ITEM_BYTES}; put large data on shared "
                    "storage and pass its path or URL instead"
                )
        task_ids: list[str] = []
        for batch in cut(specs, spec_bytes, max_count=SUBMIT_BATCH):
            task_ids += self._submit_batch(batch)
        return task_ids

    def _submit_batch(self, batch: list[TaskSpec]) -> list[str]:
        request = tasks_pb2.SubmitRequest(tasks=[convert.spec_to_proto(s) for s in batch])
        if all(s.idempotency_key for s in batch):
            response = _retry_unavailable()(self._call, self._stub.Submit, request)
        else:
            response = self._call(self._stub.Submit, request)
        return list(response.task_ids)

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """The task as the master has it now."""
        pb = _retry_unavailable()(
            self._call, self._stub.GetTask, tasks_pb2.GetTaskRequest(task_id=task_id)
        )
        return convert.task_from_proto(pb)

    def wait(self, task_ids: Sequence[str], timeout_s: float | None = None) -> Iterator[Task]:
        """Yield each task as it reaches a final state; stops when all are final or
        ``timeout_s`` passes (then fewer tasks than asked come back)."""
        request = tasks_pb2.WaitTasksBatchedRequest(task_ids=task_ids)
        if timeout_s is not None:
            request.timeout.CopyFrom(convert.duration(timeout_s))
        try:
            for batch in self._stub.WaitTasksBatched(request):
                for pb in batch.tasks:
                    yield convert.task_from_proto(pb)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def result(self, task_id: str, timeout_s: float | None = None) -> Any:
        """Wait for one task and return its decoded result.

        Raises ``TaskFailed`` if it ended FAILED or CANCELLED, and
        ``DeadlineExceeded`` if it is not final within ``timeout_s``.
        """
        for task in self.wait([task_id], timeout_s):
            return task_result(task)
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    def run(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        **options: Any,
    ) -> Any:
        """Submit ``name(*args, **kwargs)`` and return its decoded result: ``submit``
        then ``result`` in one round trip (SubmitAndWait). ``options`` are
        ``submit``'s keyword arguments.

        Raises ``TaskFailed`` if it ended FAILED or CANCELLED, and
        ``DeadlineExceeded`` if it is not final within ``timeout_s`` (it stays
        queued; its id is in the message).
        """
        spec = make_spec(name, args, kwargs, **options)
        request = tasks_pb2.SubmitAndWaitRequest(tasks=[convert.spec_to_proto(spec)])
        if timeout_s is not None:
            request.timeout.CopyFrom(convert.duration(timeout_s))
        task_id = ""
        try:
            for response in self._stub.SubmitAndWait(request):
                task_id = task_id or response.task_ids[0]
                for pb in response.tasks:
                    return task_result(convert.task_from_proto(pb))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    def cancel(self, task_id: str) -> Task:
        """Cancel a PENDING or RUNNING task; returns it as it is now."""
        pb = self._call(self._stub.CancelTask, tasks_pb2.CancelTaskRequest(task_id=task_id))
        return convert.task_from_proto(pb)

    def stats(self) -> Stats:
        """Counts per queue and state, and the connected workers."""
        pb = _retry_unavailable()(self._call, self._stub.GetStats, tasks_pb2.GetStatsRequest())
        return convert.stats_from_proto(pb)

    @staticmethod
    def _call(method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def make_spec(
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
) -> TaskSpec:
    """A TaskSpec for ``name(*args, **kwargs)`` with a JSON payload."""
    if isinstance(not_before, dt.datetime):
        not_before = not_before.timestamp()
    return TaskSpec(
        name=name,
        queue=queue,
        payload=encode_args(list(args), dict(kwargs or {})),
        content_type=JSON,
        priority=priority,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        not_before=not_before or 0.0,
        idempotency_key=idempotency_key,
        metadata=dict(metadata or {}),
    )


def task_result(task: Task) -> Any:
    """The decoded result of a final task; raises ``TaskFailed`` unless it SUCCEEDED."""
    if task.state == TaskState.SUCCEEDED:
        return decode_result(task.result, task.result_content_type)
    error = task.error
    raise TaskFailed(
        task.id,
        task.state.name,
        error.type if error else task.state.name,
        error.message if error else "",
    )
