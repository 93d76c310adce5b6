"""``TaskSpec.concurrency_key`` / ``concurrency_limit``: at most that many RUNNING
tasks share a key, and a key with a backlog does not starve the other keys.

Overlap is judged on the store's times: a task is RUNNING from ``started_at``
(its lease) to ``finished_at`` (its outcome), which contain the run itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from taskfleet.client import AsyncClient
from taskfleet.common.client import make_spec
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import Outcome, Task, TaskSpec, TaskState
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.store import open_store

import e2etasks
import pg
from procs import Gates, MasterProc, WorkerProc
from test_cli import EXIT_USAGE, ok, refused, run

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


def keyed(spec: TaskSpec, key: str, limit: int = 1) -> TaskSpec:
    return dataclasses.replace(spec, concurrency_key=key, concurrency_limit=limit)


def assert_one_at_a_time(tasks: list[Task]) -> None:
    spans = sorted((t.started_at, t.finished_at) for t in tasks)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_key_runs_one_at_a_time_while_another_key_progresses(
    store: str, start_master: StartMaster, start_worker: StartWorker, gates: Gates, tmp_path: Path
) -> None:
    url = "memory" if store == "memory" else f"sqlite:{tmp_path / 'tasks.db'}"
    master = start_master(store=url)
    start_worker(master, concurrency=4)
    gate = gates.new("a-first")
    with master.client() as client:
        # Key a's backlog is older than key b's tasks: oldest-first alone hands
        # a's tasks to every free slot, only to give them back (a is at its limit),
        # lease after lease, and b's tasks wait behind the whole backlog.
        busy = client.submit_many(
            [keyed(make_spec("block_until", [gate]), "a")]
            + [keyed(make_spec("slow_square", [n, 0.01]), "a") for n in range(100)]
        )
        others = client.submit_many(
            [keyed(make_spec("slow_square", [n, 0.05]), "b") for n in range(5)]
        )
        done_b = list(client.wait(others, timeout_s=15))
        # Key a's first task held its key the whole time: its backlog waited.
        assert [t.state for t in done_b] == [TaskState.SUCCEEDED] * len(others)
        assert client.get(busy[0]).state is TaskState.RUNNING
        assert {client.get(i).state for i in busy[1:]} == {TaskState.PENDING}
        Gates.open(gate)
        done_a = list(client.wait(busy, timeout_s=60))
    assert [t.state for t in done_a] == [TaskState.SUCCEEDED] * len(busy)
    assert all(t.attempts == 1 for t in done_a + done_b)  # releases are not attempts
    assert_one_at_a_time(done_a)
    assert_one_at_a_time(done_b)
    first = next(t for t in done_a if t.id == busy[0])
    assert all(first.started_at < t.started_at < first.finished_at for t in done_b)


def test_a_limit_without_a_key_is_refused_naming_the_field(master: MasterProc) -> None:
    with master.client() as client:
        bad = dataclasses.replace(make_spec("square", [2]), concurrency_limit=2)
        with pytest.raises(InvalidArgument, match=r"tasks\[0\]\.concurrency_key"):
            client.submit_many([bad])
        with pytest.raises(InvalidArgument, match=r"tasks\[0\]\.concurrency_limit"):
            client.submit_many([keyed(make_spec("square", [2]), "a", 0)])


def test_the_python_api_sets_a_key_and_its_limit_is_honoured(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    """submit_with, Client.submit and AsyncClient.submit all take the key: with a
    limit of 1, eight tasks on four free slots run one after the other."""
    start_worker(master, queues=queue_name, concurrency=4)
    options = {"queue": queue_name, "concurrency_key": "customer-7", "concurrency_limit": 1}

    async def submit_async() -> list[str]:
        async with AsyncClient(master.address) as aio:
            return [await aio.submit("slow_square", [n, 0.05], **options) for n in (6, 7)]

    with master.client() as client:
        ids = [
            e2etasks.slow_square.submit_with(args=(n, 0.05), client=client, **options).id
            for n in range(3)
        ]
        ids += [client.submit("slow_square", [n, 0.05], **options).id for n in range(3, 6)]
        ids += asyncio.run(submit_async())
        done = list(client.wait(ids, timeout_s=30))
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * len(ids)
    assert {(t.spec.concurrency_key, t.spec.concurrency_limit) for t in done} == {("customer-7", 1)}
    assert_one_at_a_time(done)


def test_a_key_alone_means_one_at_a_time_and_bad_limits_are_named() -> None:
    assert make_spec("square", [2], concurrency_key="k").concurrency_limit == 1
    assert make_spec("square", [2], concurrency_key="k", concurrency_limit=3).concurrency_limit == 3
    assert make_spec("square", [2]).concurrency_limit == 0
    with pytest.raises(InvalidArgument, match=r"^concurrency_key: must be set"):
        make_spec("square", [2], concurrency_limit=2)
    with pytest.raises(InvalidArgument, match=r"^concurrency_limit: must be at least 1, got 0"):
        make_spec("square", [2], concurrency_key="k", concurrency_limit=0)
    with pytest.raises(InvalidArgument, match=r"^concurrency_key: must be set"):
        e2etasks.square.s(2).set(concurrency_limit=2)


def test_the_cli_sets_a_key_and_its_limit_is_honoured(
    master: MasterProc, start_worker: StartWorker, queue_name: str
) -> None:
    start_worker(master, queues=queue_name, concurrency=4)
    lines = "".join(f"[{n}, 0.05]\n" for n in range(6))
    flags = ["--queue", queue_name, "--concurrency-key", "import-42", "--concurrency-limit", "1"]
    out = ok(
        run(
            "submit", "slow_square", "--from-stdin", *flags, "--master", master.address, stdin=lines
        )
    )
    ids = out.split()
    assert len(ids) == 6
    shown = json.loads(ok(run("get", ids[0], "--json", "--master", master.address)))
    assert (shown["concurrency_key"], shown["concurrency_limit"]) == ("import-42", 1)
    with master.client() as client:
        done = list(client.wait(ids, timeout_s=30))
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * len(ids)
    assert_one_at_a_time(done)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--concurrency-limit", "2"], "--concurrency-limit: needs --concurrency-key"),
        (["--concurrency-key", "k", "--concurrency-limit", "0"], "--concurrency-limit"),
    ],
)
def test_the_cli_refuses_a_bad_limit_before_submitting(
    master: MasterProc, queue_name: str, flags: list[str], named: str
) -> None:
    proc = run("submit", "square", "2", "--queue", queue_name, *flags, "--master", master.address)
    refused(proc, named, code=EXIT_USAGE)
    with master.client() as client:
        assert queue_name not in [q.queue for q in client.stats().queues]


def test_masters_sharing_postgresql_never_run_a_key_beyond_its_limit() -> None:
    """Eight threads leasing through two stores (two pools, as two masters have)
    race for 60 tasks of one key with a limit of 2: at no moment do more than two
    leases they were given run, and every task ends SUCCEEDED once."""
    with pg.database() as db:
        lifecycles = [Lifecycle(open_store(db), max_payload_bytes=1024) for _ in range(2)]
        ids = lifecycles[0].submit([keyed(make_spec("square", [n]), "k", 2) for n in range(60)])
        lock = threading.Lock()
        running = [0]
        peak = [0]
        done: list[str] = []

        def work(lifecycle: Lifecycle) -> None:
            deadline = time.monotonic() + 60
            while len(done) < len(ids) and time.monotonic() < deadline:
                leases = lifecycle.lease("w", ["default"], None, 2, 30.0)
                with lock:
                    running[0] += len(leases)
                    peak[0] = max(peak[0], running[0])
                for lease in leases:
                    with lock:
                        running[0] -= 1
                        done.append(lease.task.id)
                    lifecycle.record([Outcome(lease.ref, TaskState.SUCCEEDED, result=b"1")])

        threads = [threading.Thread(target=work, args=(lifecycles[i % 2],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        tasks = lifecycles[0].store.get_many(ids)
        for lifecycle in lifecycles:
            lifecycle.store.close()
    assert sorted(done) == sorted(ids)
    assert {t.state for t in tasks} == {TaskState.SUCCEEDED}
    assert 1 <= peak[0] <= 2, peak
