"""TaskService: the producers' API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Generic, Protocol, TypeVar

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from taskfleet.common import convert
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import LeaseRef, Progress, Task, TaskState
from taskfleet.master import queries
from taskfleet.master.loop import LoopQueue
from taskfleet.master.rpc import Context, streaming, unary
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.schedule_service import ScheduleRpcs
from taskfleet.master.store.base import TaskQuery
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

log = logging.getLogger("taskfleet.master.tasks")

MAX_WAIT_IDS = 100_000


class TaskService(ScheduleRpcs, tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime

    @unary
    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: Context
    ) -> tasks_pb2.SubmitResponse:
        return tasks_pb2.SubmitResponse(task_ids=await self._submit(request.tasks))

    @streaming
    async def SubmitAndWait(
        self, request: tasks_pb2.SubmitAndWaitRequest, context: Context
    ) -> AsyncGenerator[tasks_pb2.SubmitAndWaitResponse, None]:
        timeout_s = _timeout_s(request)
        task_ids = await self._submit(request.tasks)
        yield tasks_pb2.SubmitAndWaitResponse(task_ids=task_ids)
        async for message in self._finished(
            list(dict.fromkeys(task_ids)),
            timeout_s,
            tasks_pb2.SubmitAndWaitResponse,
            progress=request.progress,
        ):
            yield message

    async def _submit(self, tasks: Sequence[tasks_pb2.TaskSpec]) -> list[str]:
        specs = convert.specs_from_proto(tasks)
        task_ids = await self._rt.bridge.producers.run(self._rt.lifecycle.submit, specs)
        log.debug("submitted %d tasks", len(task_ids))
        return task_ids

    @unary
    async def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        task = await self._rt.bridge.producers.run(self._rt.store.get, request.task_id)
        return convert.task_to_proto(task)

    @streaming
    async def WaitTasks(
        self, request: tasks_pb2.WaitTasksRequest, context: Context
    ) -> AsyncGenerator[tasks_pb2.Task, None]:
        task_ids, timeout_s = _wait_request(request)
        batches = self._finished(task_ids, timeout_s, tasks_pb2.TaskBatch, request.progress)
        async for batch in batches:
            for update in batch.progress:
                yield update
            for task in batch.tasks:
                yield task

    @streaming
    async def WaitTasksBatched(
        self, request: tasks_pb2.WaitTasksBatchedRequest, context: Context
    ) -> AsyncGenerator[tasks_pb2.TaskBatch, None]:
        task_ids, timeout_s = _wait_request(request)
        async for batch in self._finished(
            task_ids, timeout_s, tasks_pb2.TaskBatch, request.progress
        ):
            yield batch

    async def _finished(
        self,
        task_ids: list[str],
        timeout_s: float | None,
        message: Callable[[], _Message],
        progress: bool = False,
    ) -> AsyncGenerator[_Message, None]:
        """The tasks as they become final, in ``message``s of those that finished
        together (the ones final already come first). With ``progress``, the
        messages also carry the progress updates of the tasks still running (the
        latest of each since the last message; a running task's current value
        at once). Ends early when the master stops (the hub wakes every waiter
        with None)."""
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        inbox: LoopQueue[Task | Progress | None] = LoopQueue(self._rt.bridge)
        # Subscribe before reading, so a task finishing in between is not missed.
        subscription = self._rt.hub.subscribe(task_ids, inbox, inbox if progress else None)
        try:
            waiting = set(task_ids)
            batch = _Batch(message)
            # Without progress, only the tasks final already matter: get_final reads no
            # more. With it, a running task's progress is in its row.
            read = self._rt.store.get_many if progress else self._rt.store.get_final
            for task in await self._rt.bridge.producers.run(read, task_ids):
                if task.state.is_final:
                    waiting.discard(task.id)
                    if batch.add(task):
                        yield batch.take()
                elif progress and (update := _progress_of(task)) and batch.add_progress(update):
                    yield batch.take()
            if batch:
                yield batch.take()
            while waiting:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await inbox.get()
                except TimeoutError:
                    return
                # Whatever else finished (or progressed) meanwhile goes in the same message.
                while item is not None:
                    if isinstance(item, Progress):
                        if item.ref.task_id in waiting and batch.add_progress(item):
                            break
                    elif item.id in waiting:
                        waiting.discard(item.id)
                        if batch.add(item):
                            break
                    try:
                        item = inbox.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if batch:
                    yield batch.take()
                if item is None:
                    return
        finally:
            subscription.close()

    @unary
    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        task = await self._rt.bridge.producers.run(self._rt.lifecycle.cancel, request.task_id)
        return convert.task_to_proto(task)

    @unary
    async def RetryTask(
        self, request: tasks_pb2.RetryTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        _require_id("task_id", request.task_id)
        task = await self._rt.bridge.producers.run(self._rt.lifecycle.retry, request.task_id)
        return convert.task_to_proto(task)

    @unary
    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: Context
    ) -> tasks_pb2.ListTasksResponse:
        query = _task_query(request)
        page_size = queries.page_size(request.page_size)
        cursor = queries.cursor_from_token(request.page_token)
        page = await self._rt.bridge.producers.run(
            self._rt.store.list_tasks, query, page_size, cursor
        )
        response = tasks_pb2.ListTasksResponse(
            next_page_token=queries.token_from_cursor(page.next_cursor)
        )
        for task in page.tasks:
            convert.fill_task(response.tasks.add(), task)
        return response

    @unary
    async def PurgeTasks(
        self, request: tasks_pb2.PurgeTasksRequest, context: Context
    ) -> tasks_pb2.PurgeTasksResponse:
        query = _task_query(request)
        count = await self._rt.bridge.producers.run(self._rt.lifecycle.purge, query)
        return tasks_pb2.PurgeTasksResponse(count=count)

    @unary
    async def GetStats(
        self, request: tasks_pb2.GetStatsRequest, context: Context
    ) -> tasks_pb2.Stats:
        stats = await self._rt.bridge.producers.run(self._rt.stats, request.pending_names)
        return convert.stats_to_proto(stats)


class _HasTasks(Protocol):
    @property
    def tasks(self) -> RepeatedCompositeFieldContainer[tasks_pb2.Task]: ...

    @property
    def progress(self) -> RepeatedCompositeFieldContainer[tasks_pb2.Task]: ...


_Message = TypeVar("_Message", bound=_HasTasks)


class _Batch(Generic[_Message]):
    """Tasks for one stream message, up to a count and a size (results can be
    large, and a message must stay well under the receiver's limit), and the
    latest progress update of each task that sent one."""

    MAX_TASKS = 1_000
    MAX_BYTES = 2 * 1024 * 1024

    def __init__(self, message: Callable[[], _Message]) -> None:
        self._new = message
        self._message = message()
        self._bytes = 0
        self._progress: dict[str, Progress] = {}

    def __bool__(self) -> bool:
        return bool(self._message.tasks or self._progress)

    def add(self, task: Task) -> bool:
        """Add ``task``; True once the batch is full."""
        convert.fill_task(self._message.tasks.add(), task)
        self._bytes += len(task.spec.payload) + len(task.result)
        return len(self._message.tasks) >= self.MAX_TASKS or self._bytes >= self.MAX_BYTES

    def add_progress(self, update: Progress) -> bool:
        """Add ``update`` in place of any earlier one of its task (the master
        coalesces what a slow reader has not taken yet); True once full."""
        if update.ref.task_id not in self._progress:
            self._bytes += len(update.message) + 50  # its id and framing, about
        self._progress[update.ref.task_id] = update
        return len(self._progress) >= self.MAX_TASKS or self._bytes >= self.MAX_BYTES

    def take(self) -> _Message:
        message, self._message, self._bytes = self._message, self._new(), 0
        if self._progress:
            # A task final in this message carries its progress already.
            final = {pb.id for pb in message.tasks}
            for task_id, update in self._progress.items():
                if task_id not in final:
                    convert.fill_progress(message.progress.add(), update)
            self._progress = {}
        return message


def _progress_of(task: Task) -> Progress | None:
    """A running task's progress as its waiters hear it, if it set any."""
    if task.state is not TaskState.RUNNING or not (task.progress or task.progress_message):
        return None
    return Progress(LeaseRef(task.id, task.lease), task.progress, task.progress_message)


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
