"""TaskService: the producers' API."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from taskfleet.common import convert
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import Stats, Task
from taskfleet.master import queries
from taskfleet.master.rpc import streaming, unary
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.store.base import TaskQuery
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

log = logging.getLogger("taskfleet.master.tasks")

MAX_WAIT_IDS = 100_000


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime

    @unary
    def Submit(
        self, request: tasks_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.SubmitResponse:
        return tasks_pb2.SubmitResponse(task_ids=self._submit(request.tasks))

    @streaming
    def SubmitAndWait(
        self, request: tasks_pb2.SubmitAndWaitRequest, context: grpc.ServicerContext
    ) -> Iterator[tasks_pb2.SubmitAndWaitResponse]:
        timeout_s = _timeout_s(request)
        task_ids = self._submit(request.tasks)
        yield tasks_pb2.SubmitAndWaitResponse(task_ids=task_ids)
        yield from self._finished(
            list(dict.fromkeys(task_ids)), timeout_s, context, tasks_pb2.SubmitAndWaitResponse
        )

    def _submit(self, tasks: Sequence[tasks_pb2.TaskSpec]) -> list[str]:
        task_ids = self._rt.lifecycle.submit(convert.specs_from_proto(tasks))
        log.debug("submitted %d tasks", len(task_ids))
        return task_ids

    @unary
    def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        return convert.task_to_proto(self._rt.store.get(request.task_id))

    @streaming
    def WaitTasks(
        self, request: tasks_pb2.WaitTasksRequest, context: grpc.ServicerContext
    ) -> Iterator[tasks_pb2.Task]:
        task_ids, timeout_s = _wait_request(request)
        for batch in self._finished(task_ids, timeout_s, context, tasks_pb2.TaskBatch):
            yield from batch.tasks

    @streaming
    def WaitTasksBatched(
        self, request: tasks_pb2.WaitTasksBatchedRequest, context: grpc.ServicerContext
    ) -> Iterator[tasks_pb2.TaskBatch]:
        task_ids, timeout_s = _wait_request(request)
        yield from self._finished(task_ids, timeout_s, context, tasks_pb2.TaskBatch)

    def _finished(
        self,
        task_ids: list[str],
        timeout_s: float | None,
        context: grpc.ServicerContext,
        message: Callable[[], _Message],
    ) -> Iterator[_Message]:
        """The tasks as they become final, in ``message``s of those that finished
        together (the ones final already come first)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Subscribe before reading, so a task finishing in between is not missed.
        subscription = self._rt.hub.subscribe(task_ids)
        context.add_callback(subscription.wake)
        try:
            waiting = set(task_ids)
            batch = _Batch(message)
            for task in self._rt.store.get_many(task_ids):
                if task.state.is_final:
                    waiting.discard(task.id)
                    if batch.add(task):
                        yield batch.take()
            if batch:
                yield batch.take()
            while waiting and context.is_active():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                if remaining is not None:  # a longer wait overflows the lock's clock
                    remaining = min(remaining, threading.TIMEOUT_MAX)
                try:
                    finished = subscription.finished.get(timeout=remaining)
                except queue.Empty:
                    return
                # Whatever else finished meanwhile goes in the same message.
                while finished is not None:
                    if finished.id in waiting:
                        waiting.discard(finished.id)
                        if batch.add(finished):
                            break
                    try:
                        finished = subscription.finished.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    yield batch.take()
                if finished is None:
                    return
        finally:
            subscription.close()

    @unary
    def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        return convert.task_to_proto(self._rt.lifecycle.cancel(request.task_id))

    @unary
    def RetryTask(
        self, request: tasks_pb2.RetryTaskRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        return convert.task_to_proto(self._rt.lifecycle.retry(request.task_id))

    @unary
    def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.ListTasksResponse:
        query = _task_query(request)
        page_size = queries.page_size(request.page_size)
        cursor = queries.cursor_from_token(request.page_token)
        page = self._rt.store.list_tasks(query, page_size, cursor)
        response = tasks_pb2.ListTasksResponse(
            next_page_token=queries.token_from_cursor(page.next_cursor)
        )
        for task in page.tasks:
            convert.fill_task(response.tasks.add(), task)
        return response

    @unary
    def PurgeTasks(
        self, request: tasks_pb2.PurgeTasksRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.PurgeTasksResponse:
        count = self._rt.lifecycle.purge(_task_query(request))
        return tasks_pb2.PurgeTasksResponse(count=count)

    @unary
    def GetStats(
        self, request: tasks_pb2.GetStatsRequest, context: grpc.ServicerContext
    ) -> tasks_pb2.Stats:
        stats = Stats(self._rt.store.stats(), self._rt.sessions.infos())
        return convert.stats_to_proto(stats)


class _HasTasks(Protocol):
    @property
    def tasks(self) -> RepeatedCompositeFieldContainer[tasks_pb2.Task]: ...


_Message = TypeVar("_Message", bound=_HasTasks)


class _Batch(Generic[_Message]):
    """Tasks for one stream message, up to a count and a size (results can be
    large, and a message must stay well under the receiver's limit)."""

    MAX_TASKS = 1_000
    MAX_BYTES = 2 * 1024 * 1024

    def __init__(self, message: Callable[[], _Message]) -> None:
        self._new = message
        self._message = message()
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._message.tasks)

    def add(self, task: Task) -> bool:
        """Add ``task``; True once the batch is full."""
        convert.fill_task(self._message.tasks.add(), task)
        self._bytes += len(task.spec.payload) + len(task.result)
        return len(self._message.tasks) >= self.MAX_TASKS or self._bytes >= self.MAX_BYTES

    def take(self) -> _Message:
        message, self._message, self._bytes = self._message, self._new(), 0
        return message


def _wait_request(
    request: tasks_pb2.WaitTasksRequest | tasks_pb2.WaitTasksBatchedRequest,
) -> tuple[list[str], float | None]:
    """The distinct task ids and the timeout of a wait, checked."""
    task_ids = list(dict.fromkeys(request.task_ids))
    if not task_ids:
        raise InvalidArgument("task_ids: name at least one task")
    if len(task_ids) > MAX_WAIT_IDS:
        raise InvalidArgument(f"task_ids: at most {MAX_WAIT_IDS} per call")
    for i, task_id in enumerate(task_ids):
        _require_id(f"task_ids[{i}]", task_id)
    return task_ids, _timeout_s(request)


def _timeout_s(
    request: tasks_pb2.WaitTasksRequest
    | tasks_pb2.WaitTasksBatchedRequest
    | tasks_pb2.SubmitAndWaitRequest,
) -> float | None:
    if not request.HasField("timeout"):
        return None
    timeout_s = convert.seconds_from_duration(request.timeout, "timeout")
    if timeout_s < 0:
        raise InvalidArgument("timeout: must not be negative")
    return timeout_s


def _task_query(request: tasks_pb2.ListTasksRequest | tasks_pb2.PurgeTasksRequest) -> TaskQuery:
    name = request.name if isinstance(request, tasks_pb2.ListTasksRequest) else ""
    return queries.task_query(request.queue, name, request.states)


def _require_id(field: str, task_id: str) -> None:
    if not task_id:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(task_id) > 200:
        raise InvalidArgument(f"{field}: longer than 200 characters")
