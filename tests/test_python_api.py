"""The Python API a task author and a caller use: @task functions that still run
locally and also submit themselves, handles with decoded results, and the
failures they raise, against a real master and worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskfleet.client import (
    AsyncClient,
    Client,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    configure,
    defaults,
)
from taskfleet.common.client import make_spec
from taskfleet.common.model import TaskState

import e2etasks
from procs import Gates, MasterProc, WorkerProc, poll

StartWorker = Callable[..., WorkerProc]


@pytest.fixture
def configured(master: MasterProc, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """The default client, made from TASKFLEET_MASTER as a user's process would."""
    monkeypatch.setenv("TASKFLEET_MASTER", master.address)
    monkeypatch.setattr(defaults, "_client", None)
    client = defaults.default_client()
    yield client
    client.close()


def test_a_task_still_runs_locally_when_called() -> None:
    assert e2etasks.square(5) == 25
    assert e2etasks.square.name == "square"
    assert e2etasks.square.__name__ == "square"
    # Pickled by reference, as a plain function is.
    assert pickle.loads(pickle.dumps(e2etasks.square)) is e2etasks.square


def test_submit_returns_a_handle_with_the_decoded_result(
    configured: Client, master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master)
    handle = e2etasks.square.submit(7)
    assert isinstance(handle, TaskHandle)
    assert isinstance(handle, str) and handle.id == str(handle)  # still the id
    assert handle.result(timeout_s=30) == 49
    snapshot = handle.get()
    assert (snapshot.state, snapshot.result, snapshot.name) == (TaskState.SUCCEEDED, 49, "square")
    assert isinstance(snapshot.finished_at, dt.datetime)
    assert snapshot.created_at <= snapshot.started_at <= snapshot.finished_at  # type: ignore[operator]
    assert snapshot.finished_at.tzinfo is dt.UTC
    assert pickle.loads(pickle.dumps(handle)) == handle.id


def test_submit_with_takes_the_options_and_another_client(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    start_worker(master, queues=queue_name)
    with master.client() as client:
        handle = e2etasks.square.submit_with(
            args=(9,), queue=queue_name, priority=3, metadata={"k": "v"}, client=client
        )
        assert handle.result(timeout_s=30) == 81
        task = client.get(handle.id)
    assert (task.spec.queue, task.spec.priority, task.spec.metadata) == (queue_name, 3, {"k": "v"})


def test_a_failure_carries_the_remote_error_and_a_cancel_is_its_own(
    configured: Client, master: MasterProc, start_worker: StartWorker, gates: Gates
) -> None:
    start_worker(master, pool="process", concurrency=1)
    with pytest.raises(TaskFailed) as failed:
        e2etasks.boom.submit("it broke").result(timeout_s=30)
    assert (failed.value.type, failed.value.message) == ("RuntimeError", "it broke")
    assert "raise RuntimeError(message)" in failed.value.remote_traceback
    assert "RuntimeError: it broke" in str(failed.value)
    assert not isinstance(failed.value, TaskCancelled)

    gate = gates.new("held")
    held = e2etasks.block_until.submit(gate)
    poll(lambda: gates.started(gate, 1), what="the task to start")
    assert held.cancel().state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        held.result(timeout_s=30)
    assert held.state is TaskState.CANCELLED


def test_configure_replaces_the_default_client(
    master: MasterProc, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKFLEET_MASTER", "127.0.0.1:1")  # nobody there
    monkeypatch.setattr(defaults, "_client", None)
    start_worker(master)
    client = configure(master.address)
    try:
        assert e2etasks.square.submit(4).result(timeout_s=30) == 16
    finally:
        client.close()


def test_an_async_client_runs_a_thousand_tasks_at_once(
    master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master, concurrency=8)

    async def main() -> None:
        async with AsyncClient(master.address) as client:
            results = await asyncio.gather(
                *(client.run("square", [n], timeout_s=60) for n in range(1000))
            )
            assert results == [n * n for n in range(1000)]
            handle = await client.submit("boom", ["async"])
            with pytest.raises(TaskFailed) as failed:
                await handle.result(timeout_s=30)
            assert failed.value.type == "RuntimeError"
            ids = await client.submit_many([make_spec("square", [n]) for n in range(300)])
            finished = [task async for task in client.wait(ids, timeout_s=60)]
            assert sorted(t.id for t in finished) == sorted(ids)
            assert (await handle.get()).state is TaskState.FAILED
            assert len((await client.stats()).workers) == 1

    asyncio.run(main())


def test_map_keeps_the_items_order_over_several_windows_and_names_a_failed_item(
    master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master, concurrency=8)

    async def main() -> None:
        async with AsyncClient(master.address) as client:
            items = range(2_500)  # three windows
            assert await client.map(e2etasks.square, items) == [n * n for n in items]
            unordered = [r async for r in client.imap_unordered("square", range(50))]
            assert sorted(unordered) == [n * n for n in range(50)]
            with pytest.raises(TaskFailed) as failed:
                await client.map(e2etasks.not_seven, range(10))
            assert "map item 7" in str(failed.value)
            assert failed.value.type == "ValueError"

    asyncio.run(main())


def test_a_task_not_started_by_its_expiry_ends_cancelled_expired_without_running(
    master: MasterProc, start_worker: StartWorker, queue_name: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    with master.client() as client:
        # Queued while no worker serves the queue; one of them expires meanwhile.
        late = e2etasks.record.submit_with(
            args=(str(marker), "late"), queue=queue_name, expires_s=0.2, client=client
        )
        kept = e2etasks.record.submit_with(
            args=(str(marker), "kept"), queue=queue_name, expires_s=600, client=client
        )
        poll(lambda: time.time() > client.get(late.id).spec.expires_at, what="the expiry")
        start_worker(master, queues=queue_name)
        assert kept.result(timeout_s=30) == "kept"
        with pytest.raises(TaskCancelled) as cancelled:
            late.result(timeout_s=30)
    assert cancelled.value.type == "Expired"
    assert marker.read_text() == "kept\n"  # the expired one never ran


def test_the_blocking_client_maps_and_hands_back_handles(
    master: MasterProc, start_worker: StartWorker
) -> None:
    start_worker(master, concurrency=8)
    with master.client() as client:
        handle = client.submit("square", [6])
        assert isinstance(handle, TaskHandle) and handle.result(timeout_s=30) == 36
        assert client.map(e2etasks.square, range(1_500)) == [n * n for n in range(1_500)]
        assert sorted(client.imap_unordered("square", range(20))) == [n * n for n in range(20)]
        lazily = client.imap("not_seven", range(10))
        assert [next(lazily) for _ in range(7)] == list(range(7))
        with pytest.raises(TaskFailed, match="map item 7"):
            next(lazily)
