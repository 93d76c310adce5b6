"""current_task().set_progress, end to end: from a task in either pool over the
worker stream to the master, seen by GetTask and the CLI's ``get``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from taskfleet.common.model import TaskState
from taskfleet.worker.process_child import Malformed, check_progress, is_progress

from dashboard_http import call, dashboard_master
from procs import Gates, MasterProc, WorkerProc, poll
from test_cli import ok, run

WAIT_S = 60.0


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
