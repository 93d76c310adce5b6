"""``AsyncClient``: the client for asyncio programs, on ``grpc.aio``.

    async with AsyncClient("127.0.0.1:50051") as client:
        print(await client.run("square", [7], timeout_s=10))   # 49

The same calls as ``Client``, awaited; one channel serves any number of
coroutines at once (a FastAPI handler per request, thousands of ``run``s
under ``asyncio.gather``) with no thread per call. Failover is ``Client``'s:
``master`` may list several masters sharing a store, a call that finds its
master unavailable moves on to the next and is sent again when that is safe
(reads, keyed submits, calls that never reached a master), and a wait resumes
after a lost stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc

from taskfleet.common import convert
from taskfleet.common.addresses import AddressRing, parse_address_list
from taskfleet.common.backoff import backoff_s
from taskfleet.common.batching import cut, spec_bytes
from taskfleet.common.calls import make_spec, task_result
from taskfleet.common.channel import CHANNEL_OPTIONS
from taskfleet.common.client import CALL_TIMEOUT_S, SUBMIT_BATCH, never_sent
from taskfleet.common.config import DEFAULT_MASTER
from taskfleet.common.errors import DeadlineExceeded, Unavailable, from_rpc_error
from taskfleet.common.handle import TaskSnapshot, snapshot
from taskfleet.common.mapping import Named, aimap
from taskfleet.common.model import Stats, Task, TaskSpec
from taskfleet.common.tls import ClientTls, client_tls
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

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

R = TypeVar("R")


class AsyncClient:
    """A connection to a master for asyncio code; ``async with`` it, or ``close()``.
    ``token`` and the TLS files are as ``Client`` takes them."""

    def __init__(
        self,
        master: str = DEFAULT_MASTER,
        *,
        token: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self._masters = AddressRing(parse_address_list("master", master))
        self._tls = client_tls(tls_ca, tls_cert, tls_key)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._address = self._masters.current
        self._channel = _open(self._address, self._tls)
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._retired: set[asyncio.Task[None]] = set()
        # Whether a master has answered: a wait then resumes for longer (Client's rule).
        self._reached = False

    def _move_on(self, address: str) -> None:
        """After a call to ``address`` found it unavailable: the next calls go to the
        next master, on a fresh channel (once, however many calls failed there).
        The old channel closes in the background, letting its calls end."""
        if address != self._address:
            return
        following = self._masters.move_on(address)
        if following == address:  # a ring of one keeps its channel
            return
        old, self._address = self._channel, following
        self._channel = _open(following, self._tls)
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        closing = asyncio.get_running_loop().create_task(old.close(CALL_TIMEOUT_S))
        self._retired.add(closing)
        closing.add_done_callback(self._retired.discard)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)
        for closing in list(self._retired):
            await closing

    # -- producing -----------------------------------------------------------

    async def submit(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncTaskHandle[Any]:
        """Enqueue ``name(*args, **kwargs)``; ``options`` as ``Client.submit``."""
        (task_id,) = await self.submit_many([make_spec(name, args, kwargs, **options)])
        return AsyncTaskHandle(task_id, self)

    async def submit_many(self, specs: Iterable[TaskSpec]) -> list[str]:
        """Enqueue many tasks in batches cut by count and bytes; their ids in order."""
        ids: list[str] = []
        for batch in cut(list(specs), spec_bytes, max_count=SUBMIT_BATCH):
            ids += await self._submit_batch(batch)
        return ids

    async def submit_workflow(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs`` in ONE Submit, as ``Client.submit_workflow``."""
        return await self._submit_batch(list(specs))

    async def _submit_batch(self, batch: list[TaskSpec]) -> list[str]:
        request = tasks_pb2.SubmitRequest(tasks=[convert.spec_to_proto(s) for s in batch])
        keyed = all(s.idempotency_key for s in batch)
        response = await self._call("Submit", request, repeatable=keyed)
        return list(response.task_ids)

    async def run(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        on_progress: OnProgress | None = None,
        **options: Any,
    ) -> Any:
        """Submit and wait for the decoded result in one round trip (SubmitAndWait);
        ``on_progress`` as ``Client.wait`` takes it (called on the loop: keep it quick)."""
        spec = make_spec(name, args, kwargs, **options)
        request = tasks_pb2.SubmitAndWaitRequest(tasks=[convert.spec_to_proto(spec)])
        if on_progress is not None:
            request.progress = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if timeout_s is not None:
            request.timeout.CopyFrom(convert.duration(timeout_s))
        task_id = ""
        try:
            address, stub = self._address, self._stub
            async for response in stub.SubmitAndWait(request, metadata=self._metadata):
                task_id = task_id or response.task_ids[0]
                report_progress(response.progress, (task_id,), on_progress)
                for pb in response.tasks:
                    return task_result(convert.task_from_proto(pb))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._move_on(address)
                if not task_id and never_sent(exc):  # nothing submitted: submit elsewhere
                    (task_id,) = await self.submit_many([spec])
                    return await self.result(task_id, _left(deadline), on_progress=on_progress)
            if not task_id or exc.code() not in RESUMABLE:
                raise from_rpc_error(exc) from None
        if task_id and (deadline is None or time.monotonic() < deadline):
            return await self.result(task_id, _left(deadline), on_progress=on_progress)
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    async def map(self, task: str | Named, items: Iterable[Any]) -> list[Any]:
        """``task(item)`` for each item, results in the items' order, as
        ``multiprocessing.Pool.map``; the first failure raises ``TaskFailed``
        naming the item. Submitted a window at a time (mapping.py)."""
        return [result async for result in aimap(self, task, items, ordered=True)]

    def imap_unordered(self, task: str | Named, items: Iterable[Any]) -> AsyncIterator[Any]:
        """``task(item)`` for each item, results as they finish."""
        return aimap(self, task, items, ordered=False)

    # -- reading -------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        pb = await self._call("GetTask", tasks_pb2.GetTaskRequest(task_id=task_id))
        return convert.task_from_proto(pb)

    async def cancel(self, task_id: str) -> Task:
        request = tasks_pb2.CancelTaskRequest(task_id=task_id)
        return convert.task_from_proto(await self._call("CancelTask", request, repeatable=False))

    async def stats(self) -> Stats:
        pb = await self._call("GetStats", tasks_pb2.GetStatsRequest())
        return convert.stats_from_proto(pb)

    async def result(
        self,
        task_id: str,
        timeout_s: float | None = None,
        *,
        on_progress: OnProgress | None = None,
    ) -> Any:
        """The decoded result of one task; raises as ``Client.result`` does."""
        async for task in self.wait([task_id], timeout_s, on_progress=on_progress):
            return task_result(task)
        raise DeadlineExceeded(f"task {task_id} not finished within {timeout_s} s")

    async def wait(
        self,
        task_ids: Sequence[str],
        timeout_s: float | None = None,
        *,
        on_progress: OnProgress | None = None,
    ) -> AsyncIterator[Task]:
        """Each task as it becomes final, until all are or ``timeout_s`` passes;
        ``on_progress`` as ``Client.wait`` takes it (called on the loop)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        distinct = list(dict.fromkeys(task_ids))
        for start in range(0, len(distinct), WAIT_CHUNK):
            chunk = distinct[start : start + WAIT_CHUNK]
            async for task in self._wait_chunk(chunk, deadline, on_progress):
                yield task

    async def _wait_chunk(
        self, task_ids: list[str], deadline: float | None, on_progress: OnProgress | None
    ) -> AsyncIterator[Task]:
        waiting = dict.fromkeys(task_ids)
        resumption = Resumption(deadline)
        while waiting:
            request = wait_request(waiting, deadline, on_progress)
            try:
                address, stub = self._address, self._stub
                async for batch in stub.WaitTasksBatched(request, metadata=self._metadata):
                    resumption.heard()
                    self._reached = True
                    report_progress(batch.progress, waiting, on_progress)
                    for task in take_final(batch, waiting):
                        yield task
                if not waiting or (deadline is not None and time.monotonic() >= deadline):
                    return
                cause = "the master ended the wait early"
            except grpc.RpcError as exc:
                if exc.code() not in RESUMABLE:
                    raise from_rpc_error(exc) from None
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._move_on(address)
                cause = str(from_rpc_error(exc))
                self._reached |= not never_sent(exc)
            await asyncio.sleep(resumption.pause_s(cause, len(waiting), reached=self._reached))

    async def _call(self, method: str, request: Any, *, repeatable: bool = True) -> Any:
        """The unary call ``method`` on the current master; on UNAVAILABLE the next
        master becomes current, and the call is made again there (with backoff,
        for RETRY_UNAVAILABLE_S) if it is ``repeatable`` or never reached one."""
        give_up = time.monotonic() + RETRY_UNAVAILABLE_S
        attempt = 0
        while True:
            address, stub = self._address, self._stub
            try:
                call: Callable[..., Awaitable[Any]] = getattr(stub, method)
                return await call(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, Unavailable):
                    raise error from None
                self._move_on(address)
                if not (repeatable or never_sent(exc)) or time.monotonic() >= give_up:
                    raise error from None
            attempt += 1
            await asyncio.sleep(backoff_s(attempt, base_s=0.1, cap_s=2.0))


class AsyncTaskHandle(str, Generic[R]):
    """``TaskHandle`` for an ``AsyncClient``: the id, with awaitable calls."""

    _client: AsyncClient

    def __new__(cls, task_id: str, client: AsyncClient) -> AsyncTaskHandle[R]:
        handle = super().__new__(cls, task_id)
        handle._client = client
        return handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))

    @property
    def id(self) -> str:
        return str(self)

    async def get(self) -> TaskSnapshot:
        return snapshot(await self._client.get(self.id))

    async def result(
        self, timeout_s: float | None = None, *, on_progress: OnProgress | None = None
    ) -> R:
        value: R = await self._client.result(self.id, timeout_s, on_progress=on_progress)
        return value

    async def cancel(self) -> TaskSnapshot:
        return snapshot(await self._client.cancel(self.id))


def _open(address: str, tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
