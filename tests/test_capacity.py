"""How many open streams a master holds: thousands of WaitTasks calls and hundreds
of worker streams stay open while Submit, GetStats and health checks still
answer, and streams past ``--max-streams`` are refused with RESOURCE_EXHAUSTED
while unary calls go on being served.

The streams are driven from one grpc.aio client in the test, so thousands of
them cost the test a few objects each, as they should cost the master."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskfleet.common import convert
from taskfleet.common.client import make_spec
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2, worker_pb2_grpc

from procs import MasterProc

WAITS = 2000
WORKERS = 500
CHANNELS = 8  # connections the streams are spread over
CALL_DEADLINE_S = 5.0  # generous: proves "answers", not "answers fast"
OPEN_DEADLINE_S = 90.0
SAMPLES = 20  # of each unary call  # for opening every stream; the old threaded master never did

StartMaster = Callable[..., MasterProc]


@asynccontextmanager
async def channels(address: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """``count`` channels, each on a connection of its own."""
    opened = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close()


def spec(queue_name: str) -> tasks_pb2.TaskSpec:
    return convert.spec_to_proto(make_spec("square", [3], queue=queue_name))


async def open_wait(
    channel: grpc.aio.Channel, task_ids: list[str], final_id: str
) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """A WaitTasksBatched stream, open for sure once its first message (the task
    that is final already) has arrived."""
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    call = stub.WaitTasksBatched(tasks_pb2.WaitTasksBatchedRequest(task_ids=task_ids))
    first = await call.read()
    assert [t.id for t in first.tasks] == [final_id]
    return call


async def open_worker(
    channel: grpc.aio.Channel, worker_id: str, queue_name: str
) -> grpc.aio.StreamStreamCall[Any, Any]:
    """A worker stream that said Hello, was welcomed, and gave credit for one task."""
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    call = stub.Connect()
    hello = worker_pb2.Hello(
        worker_id=worker_id,
        hostname=socket.gethostname(),
        pid=1,
        queues=[queue_name],
        task_names=["square"],
        concurrency=1,
    )
    await call.write(worker_pb2.WorkerMessage(hello=hello))
    welcome = await call.read()
    assert welcome.WhichOneof("kind") == "welcome"
    await call.write(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=1)))
    return call


async def timed(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return (time.perf_counter() - started) * 1000


async def unary_latencies_ms(channel: grpc.aio.Channel, queue_name: str) -> dict[str, list[float]]:
    """Submit, GetStats and a health check, ``SAMPLES`` times each, every one
    within the deadline."""
    tasks = tasks_pb2_grpc.TaskServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    latencies: dict[str, list[float]] = {"Submit": [], "GetStats": [], "Health.Check": []}
    for _ in range(SAMPLES):
        submit = tasks.Submit(
            tasks_pb2.SubmitRequest(tasks=[spec(queue_name)]), timeout=CALL_DEADLINE_S
        )
        latencies["Submit"].append(await timed(submit))
        stats = tasks.GetStats(tasks_pb2.GetStatsRequest(), timeout=CALL_DEADLINE_S)
        latencies["GetStats"].append(await timed(stats))
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S)
        latencies["Health.Check"].append(await timed(check))
    return latencies


def report(title: str, latencies: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    for name, values in latencies.items():
        print(f"  {name:13} median {statistics.median(values):7.1f} ms   max {max(values):7.1f} ms")


def test_thousands_of_open_streams_leave_unary_calls_answering(
    start_master: StartMaster, tmp_path: Path
) -> None:
    # The default store; a long lease, as the hand-driven workers never heartbeat.
    master = start_master(store=f"sqlite:{tmp_path / 'capacity.db'}", lease_s=120.0)
    asyncio.run(_many_streams(master.address))


async def _many_streams(address: str) -> None:
    waited_queue, worker_queue = f"q-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    async with channels(address, CHANNELS + 1) as (control, *spread):
        tasks = tasks_pb2_grpc.TaskServiceStub(control)
        # Given a task that stays pending (no worker serves its queue) and one final already
        submitted = await tasks.Submit(
            tasks_pb2.SubmitRequest(tasks=[spec(waited_queue), spec(waited_queue)]),
            timeout=CALL_DEADLINE_S,
        )
        pending_id, final_id = submitted.task_ids
        await tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=final_id), timeout=5)
        before = await unary_latencies_ms(control, waited_queue)

        # When 2,000 waits and 500 worker streams are open at once
        started = time.perf_counter()
        async with asyncio.timeout(OPEN_DEADLINE_S):
            waits = await asyncio.gather(
                *(
                    open_wait(spread[i % CHANNELS], [pending_id, final_id], final_id)
                    for i in range(WAITS)
                )
            )
            workers = await asyncio.gather(
                *(
                    open_worker(spread[i % CHANNELS], f"capacity-{i}", worker_queue)
                    for i in range(WORKERS)
                )
            )
        opened_s = time.perf_counter() - started
        stats = await tasks.GetStats(tasks_pb2.GetStatsRequest(), timeout=CALL_DEADLINE_S)
        assert sum(1 for w in stats.workers if w.worker_id.startswith("capacity-")) == WORKERS

        # Then Submit, GetStats and health checks still answer within their deadline,
        # with the tasks submitted to the workers' queue, so that each Submit wakes them
        during = await unary_latencies_ms(control, worker_queue)
        print(f"\nopened {WAITS} waits and {WORKERS} worker streams in {opened_s:.1f} s")
        report("idle master:", before)
        report(f"with {WAITS} waits and {WORKERS} worker streams open:", during)
        # And the worker streams took those tasks
        await _until_running(tasks, worker_queue, len(during["Submit"]))

        # And every wait is still live: cancelling the pending task ends all of them
        await tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=pending_id), timeout=5)
        async with asyncio.timeout(OPEN_DEADLINE_S):
            lasts = await asyncio.gather(*(wait.read() for wait in waits))
        assert all([t.id for t in last.tasks] == [pending_id] for last in lasts)
        for worker in workers:
            worker.cancel()


async def _until_running(
    tasks: tasks_pb2_grpc.TaskServiceStub, queue_name: str, count: int
) -> None:
    async with asyncio.timeout(OPEN_DEADLINE_S):
        while True:
            stats = await tasks.GetStats(tasks_pb2.GetStatsRequest(), timeout=CALL_DEADLINE_S)
            if any(q.queue == queue_name and q.running == count for q in stats.queues):
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("limit", [4])
def test_streams_past_the_limit_are_refused_and_unary_calls_still_served(
    start_master: StartMaster, limit: int
) -> None:
    master = start_master(extra=["--max-streams", str(limit)])
    asyncio.run(_past_the_limit(master.address, limit))


async def _past_the_limit(address: str, limit: int) -> None:
    waited_queue, worker_queue = f"q-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    async with channels(address, 1) as (channel,):
        tasks = tasks_pb2_grpc.TaskServiceStub(channel)
        submitted = await tasks.Submit(
            tasks_pb2.SubmitRequest(tasks=[spec(waited_queue), spec(waited_queue)]), timeout=5
        )
        pending_id, final_id = submitted.task_ids
        await tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=final_id), timeout=5)
        # Given as many open streams as the limit allows, waits and a worker together
        waits = [
            await open_wait(channel, [pending_id, final_id], final_id) for _ in range(limit - 1)
        ]
        worker = await open_worker(channel, "at-the-limit", worker_queue)

        # When one more wait and one more worker stream are opened
        # Then both are refused with RESOURCE_EXHAUSTED, naming the limit
        for extra in (
            open_wait(channel, [pending_id, final_id], final_id),
            open_worker(channel, "past-the-limit", worker_queue),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await extra
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"at most {limit}" in (refused.value.details() or "")
            assert "--max-streams" in (refused.value.details() or "")

        # And unary calls are still served
        latencies = await unary_latencies_ms(channel, waited_queue)
        assert all(len(values) == SAMPLES for values in latencies.values())

        # And a stream that ends frees its place for a new one
        waits.pop().cancel()
        replacement = await _eventually(
            lambda: open_wait(channel, [pending_id, final_id], final_id)
        )
        replacement.cancel()
        worker.cancel()
        for wait in waits:
            wait.cancel()


async def _eventually(
    attempt: Callable[[], Awaitable[grpc.aio.UnaryStreamCall[Any, Any]]],
) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """``attempt()`` once the master has seen a cancelled stream end (it learns of
    the cancel asynchronously), within a deadline."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            await asyncio.sleep(0.05)
