"""current_task().set_progress, end to end: from a task in either pool over the
worker stream to the master, seen by GetTask, the CLI's ``get``, the dashboard,
and the waits that ask for it (on this master or, on PostgreSQL, another)."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
from collections.abc import Callable, Iterator

import grpc
import pytest

from taskfleet.client import AsyncClient, TaskProgress
from taskfleet.common.model import LeaseRef, Progress, Task, TaskState
from taskfleet.master.events import CompletionHub
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc
from taskfleet.worker.process_child import Malformed, check_progress, is_progress

import pg
from dashboard_http import call, dashboard_master
from procs import Gates, MasterProc, WorkerProc, poll
from test_cli import TASKFLEET, _env, ok, run

WAIT_S = 60.0
# What progress_gated sets, step by step, with three gates.
STEPS = [(0.25, "step 1"), (0.5, "step 2"), (0.75, "step 3")]


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_progress_is_seen_while_the_task_runs_and_kept_once_it_ends(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
    pool: str,
) -> None:
    # Given a task that sets progress four times, then blocks on a gate
    start_worker(master, pool=pool, concurrency=2, queues=queue_name)
    gate = gates.new("progress")
    with master.client() as client:
        task_id = client.submit("progress_steps", [gate, 4], queue=queue_name)

        # When it is blocked, GetTask shows the latest fraction and message
        running = poll(
            lambda: (t := client.get(task_id)).progress_message == "step 4" and t,
            WAIT_S,
            "the last progress update to reach the master",
        )
        assert running.state is TaskState.RUNNING
        assert running.progress == 0.8

        # And the CLI's get shows it, in JSON and for a person
        shown = json.loads(ok(run("get", task_id, "--json", "--master", master.address)))
        assert (shown["progress"], shown["progress_message"]) == (0.8, "step 4")
        text = ok(run("get", task_id, "--master", master.address))
        assert "progress_message: step 4" in text

        # Then once released, its update right before returning is kept with the outcome
        Gates.open(gate)
        (final,) = list(client.wait([task_id], timeout_s=WAIT_S))
    assert final.state is TaskState.SUCCEEDED, final.error
    assert (final.progress, final.progress_message) == (1.0, "done")


@pytest.mark.parametrize("pool", ["thread", "process"])
@pytest.mark.parametrize("fraction", [1.5, -0.1, True, "half"])
def test_a_fraction_outside_0_to_1_raises_value_error_in_the_task(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
    pool: str,
    fraction: object,
) -> None:
    start_worker(master, pool=pool, concurrency=1, queues=queue_name)
    with master.client() as client:
        task_id = client.submit("bad_progress", [fraction], queue=queue_name, max_attempts=1)
        (final,) = list(client.wait([task_id], timeout_s=WAIT_S))
    assert final.state is TaskState.FAILED
    assert final.error is not None and final.error.type == "ValueError"
    assert "progress fraction must be a number from 0 to 1" in final.error.message
    assert (final.progress, final.progress_message) == (0.0, "")


@pytest.mark.parametrize(
    "message",
    [(1.5, "x"), (1, "x"), ("0.5", "x"), (0.5, b"x"), (float("nan"), "x"), (0.5, None)],
)
def test_a_progress_frame_that_set_progress_cannot_have_sent_is_malformed(
    message: object,
) -> None:
    # A pool process's junk that happens to unpickle as a 2-tuple costs that
    # process and its job (Malformed), never a wrong progress.
    assert is_progress(message)
    with pytest.raises(Malformed):
        check_progress(message)
    assert check_progress((0.5, "half")) == (0.5, "half")


def test_the_dashboard_task_page_data_carries_progress(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    master, base = dashboard_master(start_master)
    start_worker(master, queues=queue_name)
    gate = gates.new("dashboard")
    with master.client() as client:
        task_id = client.submit("progress_steps", [gate, 1], queue=queue_name)
        shown = poll(
            lambda: (
                (t := call(f"{base}/api/tasks/{task_id}").json())["progress_message"] == "step 1"
                and t
            ),
            WAIT_S,
            "the dashboard to show the progress",
        )
        assert (shown["state"], shown["progress"]) == ("running", 0.5)
        Gates.open(gate)
        list(client.wait([task_id], timeout_s=WAIT_S))


# -- waits that ask for progress -------------------------------------------------


class Stepper:
    """An ``on_progress`` callback driving a ``progress_gated`` task: hearing "step k"
    opens gate k, so the task sets its next step only once this wait heard the last.
    Records what it heard, a repeat of the latest value left out (a running task's
    current value may come both from the wait's first read and as it is sent)."""

    def __init__(self, gates: Gates, name: str) -> None:
        self.gates = [gates.new(f"{name}-{k}") for k in range(1, len(STEPS) + 1)]
        self.heard: list[tuple[float, str]] = []

    def __call__(self, update: TaskProgress) -> None:
        seen = (update.fraction, update.message)
        if not self.heard or self.heard[-1] != seen:
            self.heard.append(seen)
        Gates.open(self.gates[int(update.message.split()[1]) - 1])


def hear_steps(
    waiter: MasterProc,
    runner: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    """A wait on ``waiter`` drives a gated task that a worker of ``runner`` runs."""
    # Given a task that sets 0.25, 0.5 and 0.75, each time waiting for a gate
    start_worker(runner, pool="thread", queues=queue_name)
    stepper = Stepper(gates, "wait")
    with waiter.client() as client:
        handle = client.submit("progress_gated", [stepper.gates], queue=queue_name)

        # When a wait for its result opens each gate on hearing that step
        result = handle.result(timeout_s=WAIT_S, on_progress=stepper)

    # Then it heard every step, in order, while the task ran (the task could
    # not have finished otherwise), and then had the result
    assert stepper.heard == STEPS
    assert result == "finished"


def test_a_wait_that_asks_hears_each_progress_update_before_the_result(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    hear_steps(master, master, start_worker, gates, queue_name)


def test_the_hub_hands_progress_only_to_the_waits_that_asked_for_it() -> None:
    hub = CompletionHub()
    plain: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
    asked: queue.SimpleQueue[Task | Progress | None] = queue.SimpleQueue()
    hub.subscribe(["t1"], plain)
    subscription = hub.subscribe(["t1", "t2"], asked, asked)
    half = Progress(LeaseRef("t1", 1), 0.5, "half")

    hub.progressed([half, Progress(LeaseRef("t3", 1), 0.1, "not awaited")])

    assert asked.get_nowait() == half and asked.empty()
    assert plain.empty()
    subscription.close()
    hub.progressed([half])
    assert asked.empty()
    assert hub.waited() == ["t1"]


def test_async_run_hears_progress_through_submit_and_wait(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    start_worker(master, pool="process", concurrency=1, queues=queue_name)
    stepper = Stepper(gates, "run")

    async def main() -> str:
        async with AsyncClient(master.address) as client:
            result: str = await client.run(
                "progress_gated",
                [stepper.gates],
                queue=queue_name,
                timeout_s=WAIT_S,
                on_progress=stepper,
            )
            return result

    assert asyncio.run(main()) == "finished"
    assert stepper.heard == STEPS


def test_a_wait_stream_carries_progress_only_when_asked(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    steps = [gates.new(f"raw-{k}") for k in range(1, len(STEPS) + 1)]
    with master.client() as client, grpc.insecure_channel(master.address) as channel:
        # Given a gated task, and two WaitTasks streams on it, open before it runs:
        # one asks for progress, the other is a client from before progress existed
        task_id = client.submit("progress_gated", [steps], queue=queue_name)
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        plain = stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=[task_id]), timeout=WAIT_S)
        asked = stub.WaitTasks(
            tasks_pb2.WaitTasksRequest(task_ids=[task_id], progress=True), timeout=WAIT_S
        )
        start_worker(master, pool="thread", queues=queue_name)

        # When each update on the stream that asked opens the gate of its step
        messages = []
        for pb in asked:
            messages.append(pb)
            if pb.state == tasks_pb2.TASK_STATE_RUNNING:
                Gates.open(steps[int(pb.progress_message.split()[1]) - 1])
        plain_messages = list(plain)

        # And a wait for an unknown id asks for progress too
        unknown = "0" * 32
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=[unknown], progress=True)))

    # Then that stream had each step as a bare RUNNING task, then the whole final task once
    *updates, final = messages
    assert all(u.state == tasks_pb2.TASK_STATE_RUNNING for u in updates)
    assert list(dict.fromkeys((u.progress, u.progress_message) for u in updates)) == STEPS
    for update in updates:
        assert update.id == task_id
        assert not update.HasField("spec") and not update.HasField("created_at")
    assert final.state == tasks_pb2.TASK_STATE_SUCCEEDED
    assert (final.spec.name, final.progress, final.progress_message) == (
        "progress_gated",
        0.75,
        "step 3",
    )
    # And the stream that did not ask had the final task only, as before
    assert plain_messages == [final]
    # And bad input is refused as it always was
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown in (refused.value.details() or "")


def test_the_cli_wait_prints_progress_lines_when_asked(
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    start_worker(master, pool="thread", queues=queue_name)
    steps = [gates.new(f"cli-{k}") for k in range(1, len(STEPS) + 1)]
    with master.client() as client:
        task_id = client.submit("progress_gated", [steps], queue=queue_name)
    # When `taskfleet wait --progress` runs, each line it prints opens its step's gate
    command = [TASKFLEET, "wait", task_id, "--progress", "--master", master.address]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    ) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if " RUNNING " in line:
                Gates.open(steps[int(line.split()[-1]) - 1])
        assert proc.wait(timeout=WAIT_S) == 0, proc.stderr.read() if proc.stderr else ""
    # Then it printed each step while the task ran, then the outcome
    *updates, final = lines
    assert list(dict.fromkeys(updates)) == [
        f"{task_id} RUNNING 25% step 1",
        f"{task_id} RUNNING 50% step 2",
        f"{task_id} RUNNING 75% step 3",
    ]
    assert final == f"{task_id} SUCCEEDED finished"


@pytest.fixture
def db() -> Iterator[str]:
    with pg.database() as url:
        yield url


def test_a_wait_on_one_master_hears_progress_of_a_task_run_through_another(
    db: str,
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
    queue_name: str,
) -> None:
    # Given two masters on one database: the waiter on A, the worker on B. After
    # the first step (which A may read from the store when the wait starts), the
    # task runs on only once the update B stored has reached A's waiter (NOTIFY).
    a, b = start_master(store=db), start_master(store=db)
    hear_steps(a, b, start_worker, gates, queue_name)
