"""Dependencies between tasks and the workflows built on them (chain, group,
chord), against a real master and worker: results flow from parent to child,
a failed parent cancels its whole tree at once, bad references are refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import flowtasks
import grpc
import pytest

from taskfleet.client import AsyncClient, chain, chord, group, signature
from taskfleet.common import convert
from taskfleet.common.client import Client, make_spec
from taskfleet.common.errors import FailedPrecondition, InvalidArgument
from taskfleet.common.model import TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

import pg
from procs import MasterProc, WorkerProc

StartWorker = Callable[..., WorkerProc]
TIMEOUT_S = 60.0


def test_a_three_step_chain_passes_each_result_to_the_next(
    master: MasterProc, client: Client, start_worker: StartWorker
) -> None:
    start_worker(master, tasks="flowtasks")
    steps = chain(flowtasks.add.s(1, 2), flowtasks.add.s(10), flowtasks.mul.s(3))

    handle = steps.submit(client=client)

    assert handle.result(timeout_s=TIMEOUT_S) == (1 + 2 + 10) * 3
    first, second, last = (client.get(i) for i in _chain_ids(client, handle.id))
    assert [t.spec.name for t in (first, second, last)] == ["add", "add", "mul"]
    assert second.spec.depends_on == (first.id,) and last.spec.depends_on == (second.id,)
    assert second.finished_at <= last.started_at


def test_a_chord_sums_a_hundred_squares(
    master: MasterProc, client: Client, start_worker: StartWorker
) -> None:
    start_worker(master, tasks="flowtasks")
    squares = group(flowtasks.square_of.s(i) for i in range(100))

    handle = chord(squares, flowtasks.total.s()).submit(client=client)

    assert handle.result(timeout_s=TIMEOUT_S) == sum(i * i for i in range(100))
    callback = client.get(handle.id)
    assert len(callback.spec.depends_on) == 100
    parents = [client.get(p) for p in callback.spec.depends_on]
    assert all(p.finished_at <= callback.started_at for p in parents)


def test_the_async_client_submits_a_group_and_a_chain(
    master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master, tasks="flowtasks")

    async def main() -> tuple[list[int], int]:
        async with AsyncClient(master.address) as client:
            members = await group(flowtasks.square_of.s(i) for i in range(5)).submit_async(client)
            last = await chain(signature("add", [2, 3]), signature("mul", [4])).submit_async(client)
            results = [await h.result(timeout_s=TIMEOUT_S) for h in members]
            return results, await last.result(timeout_s=TIMEOUT_S)

    assert asyncio.run(main()) == ([0, 1, 4, 9, 16], 20)


def test_a_failed_parent_cancels_a_two_level_tree_at_once(
    master: MasterProc, client: Client, start_worker: StartWorker
) -> None:
    # Given a failing parent, a child and a grandchild, submitted before any worker
    specs = [
        signature("fail", ["no"]).spec(),
        signature("add", [1]).spec(["$0"], pass_results=True),
        signature("add", [1]).spec(["$1"], pass_results=True),
        signature("square_of", [3]).spec(),
    ]
    parent, child, grandchild, free = client.submit_workflow(specs)
    assert client.get(grandchild).state is TaskState.PENDING

    # When a worker runs the parent and it fails
    start_worker(master, tasks="flowtasks")
    ended = {t.id: t for t in client.wait([parent, child, grandchild], timeout_s=TIMEOUT_S)}

    # Then the waiter hears of the whole tree, ended in the parent's transaction
    assert ended[parent].state is TaskState.FAILED
    for task_id in (child, grandchild):
        task = ended[task_id]
        assert task.state is TaskState.CANCELLED
        assert task.error is not None and task.error.type == "ParentFailed"
        assert task.attempts == 0
        assert task.finished_at == ended[parent].finished_at
    assert client.result(free, timeout_s=TIMEOUT_S) == 9
    # and a dependent cannot be retried on its own (its parent's result is missing)
    with pytest.raises(FailedPrecondition, match="ParentFailed"):
        client.retry(grandchild)


def test_a_task_may_depend_on_existing_tasks(
    master: MasterProc, client: Client, start_worker: StartWorker
) -> None:
    done = client.submit("square_of", [4])
    start_worker(master, tasks="flowtasks")
    assert client.result(done, timeout_s=TIMEOUT_S) == 16
    running = client.submit("square_of", [5])

    (child,) = client.submit_workflow([signature("add").spec([done, running], pass_results=True)])

    assert client.result(child, timeout_s=TIMEOUT_S) == 16 + 25
    # A parent that already failed could never let the child run
    failed = client.submit("fail", ["no"])
    list(client.wait([failed], timeout_s=TIMEOUT_S))
    with pytest.raises(FailedPrecondition, match=rf"tasks\[0\]\.depends_on\[0\]: task {failed}"):
        client.submit_workflow([signature("add", [1, 2]).spec([failed])])


@pytest.mark.parametrize(
    ("depends_on", "message"),
    [
        (["$1"], r"tasks\[1\]\.depends_on\[0\]: \$1 must name an earlier task"),
        (["$0", "$2"], r"tasks\[1\]\.depends_on\[1\]: \$2 must name an earlier task"),
        (["$0", "f00d"], r"tasks\[1\]\.depends_on\[1\]: no task f00d"),
        (["$x"], r"tasks\[1\]\.depends_on\[0\]: '\$x' is neither a task id nor \$N"),
    ],
)
def test_self_forward_and_unknown_references_are_refused_naming_the_field(
    client: Client, depends_on: list[str], message: str
) -> None:
    before = client.stats().queues
    specs = [make_spec("square_of", [1]), signature("add", [1, 2]).spec(depends_on)]

    with pytest.raises(InvalidArgument, match=message):
        client.submit_workflow(specs)

    assert client.stats().queues == before  # nothing of the request was stored


def _chain_ids(client: Client, last_id: str) -> list[str]:
    """The ids of a chain, walked back from its last step."""
    ids = [last_id]
    while parents := client.get(ids[0]).spec.depends_on:
        ids.insert(0, parents[0])
    return ids


def test_on_postgresql_a_child_readied_through_one_master_runs_on_a_worker_of_another(
    start_master: Callable[..., MasterProc], start_worker: StartWorker
) -> None:
    # Given two masters on one database, each with a worker for one queue only
    with pg.database() as db:
        a, b = start_master(store=db), start_master(store=db)
        start_worker(a, tasks="flowtasks", queues="first")
        start_worker(b, tasks="flowtasks", queues="second")
        steps = chain(
            flowtasks.add.s(1, 2).set(queue="first"),
            flowtasks.mul.s(5).set(queue="second"),
            flowtasks.add.s(1).set(queue="first"),
        )
        with a.client() as client:
            # When a chain alternates between them
            handle = steps.submit(client=client)

            # Then each step is readied in the database and picked up by the other side
            assert handle.result(timeout_s=TIMEOUT_S) == (1 + 2) * 5 + 1
            # and a failure through B cancels A's waiting dependents at once
            failing = [
                signature("fail", ["no"], queue="second").spec(),
                signature("add", [1], queue="first").spec(["$0"], pass_results=True),
            ]
            parent, child = client.submit_workflow(failing)
            ended = {t.id: t for t in client.wait([parent, child], timeout_s=TIMEOUT_S)}
        assert ended[child].state is TaskState.CANCELLED
        assert ended[child].finished_at == ended[parent].finished_at


def test_submit_and_wait_takes_dollar_references_and_reports_the_whole_chain(
    master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master, tasks="flowtasks")
    specs = chain(flowtasks.add.s(2, 2), flowtasks.mul.s(10)).specs()
    request = tasks_pb2.SubmitAndWaitRequest(tasks=[convert.spec_to_proto(s) for s in specs])
    with grpc.insecure_channel(master.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        responses = list(stub.SubmitAndWait(request, timeout=TIMEOUT_S))

    first, second = responses[0].task_ids
    finished = {t.id: t for r in responses[1:] for t in r.tasks}
    assert set(finished) == {first, second}
    assert list(finished[second].spec.depends_on) == [first]
    assert json.loads(finished[second].result) == 40
