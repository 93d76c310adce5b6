"""Schedules with real masters and workers: ticks fire tasks on time, once, and
stop when a schedule is deleted or paused; two masters on one PostgreSQL
database never fire a tick twice."""

from __future__ import annotations

import datetime
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskfleet.common.client import Client, make_spec
from taskfleet.common.errors import InvalidArgument, NotFound
from taskfleet.common.model import SCHEDULE_ID_KEY, SCHEDULE_TICK_KEY, Schedule, Task, TaskState

import pg
from procs import MasterProc, WorkerProc, poll
from test_cli import ok, refused, run

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


def fired(client: Client, schedule: Schedule) -> list[Task]:
    """The tasks ``schedule`` fired, oldest first."""
    tasks = client.list_tasks(name=schedule.spec.name, page_size=1000)
    return sorted(
        (t for t in tasks if t.spec.metadata.get(SCHEDULE_ID_KEY) == schedule.id),
        key=lambda t: t.created_at,
    )


def wait_fired(client: Client, schedule: Schedule, count: int, timeout_s: float = 30) -> None:
    poll(
        lambda: len(fired(client, schedule)) >= count,
        timeout_s,
        f"schedule {schedule.id} to fire {count} times",
    )


def ticks(tasks: list[Task]) -> list[float]:
    return [
        datetime.datetime.fromisoformat(t.spec.metadata[SCHEDULE_TICK_KEY]).timestamp()
        for t in tasks
    ]


def test_a_one_second_schedule_fires_each_second_and_never_after_delete(
    master: MasterProc, start_worker: StartWorker, client: Client, queue_name: str
) -> None:
    start_worker(master, queues=queue_name)
    spec = make_spec("square", [4], queue=queue_name, metadata={"team": "ops"})
    schedule = client.create_schedule(spec, interval_s=1.0)
    assert schedule.id and schedule.next_fire == pytest.approx(schedule.created_at + 1.0)

    window_end = schedule.created_at + 5.5
    poll(lambda: time.time() >= window_end, 30, "the 5.5 s window to pass")  # a measurement
    client.delete_schedule(schedule.id)
    in_window = [t for t in fired(client, schedule) if t.created_at <= window_end]
    assert 4 <= len(in_window) <= 7, [t.created_at - schedule.created_at for t in in_window]
    assert len(set(ticks(in_window))) == len(in_window)  # each tick once
    assert all(t.spec.metadata["team"] == "ops" for t in in_window)
    # Fired tasks reach workers like submitted ones.
    done = list(client.wait([t.id for t in in_window], timeout_s=30))
    assert {t.state for t in done} == {TaskState.SUCCEEDED}
    assert all(client.result(t.id) == 16 for t in done)

    # A schedule created after the delete fires twice: long enough for the deleted
    # one to have fired again, had it been going to.
    count = len(fired(client, schedule))
    sentinel = client.create_schedule(make_spec("square", [1], queue=queue_name), interval_s=1.0)
    wait_fired(client, sentinel, 2)
    assert len(fired(client, schedule)) == count
    assert schedule.id not in {s.id for s in client.schedules()}


def test_a_cron_schedule_fires_on_its_ticks_in_its_time_zone(
    client: Client, queue_name: str
) -> None:
    # Every second second (cron's optional sixth field), read in a zone half an
    # hour off UTC: the ticks still fall on even seconds.
    spec = make_spec("square", [2], queue=queue_name)
    schedule = client.create_schedule(spec, cron="* * * * * */2", timezone="Asia/Kolkata")
    assert schedule.next_fire % 2 == 0 and schedule.next_fire > schedule.created_at
    wait_fired(client, schedule, 2)
    first, second = ticks(fired(client, schedule))[:2]
    assert first == schedule.next_fire
    assert second - first == 2.0
    (listed,) = [s for s in client.schedules() if s.id == schedule.id]
    assert listed.last_fire >= second and listed.timezone == "Asia/Kolkata"


def test_a_paused_schedule_fires_nothing_until_resumed(client: Client, queue_name: str) -> None:
    schedule = client.create_schedule(make_spec("square", [3], queue=queue_name), interval_s=1.0)
    wait_fired(client, schedule, 1)
    paused = client.pause_schedule(schedule.id)
    assert paused.paused
    count = len(fired(client, schedule))

    sentinel = client.create_schedule(make_spec("square", [1], queue=queue_name), interval_s=1.0)
    wait_fired(client, sentinel, 2)
    assert len(fired(client, schedule)) == count

    resumed = client.resume_schedule(schedule.id)
    assert not resumed.paused and resumed.next_fire > time.time() - 1
    wait_fired(client, schedule, count + 1)
    client.delete_schedule(sentinel.id)
    client.delete_schedule(schedule.id)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cron": "61 * * * *"}, "schedule.cron"),
        ({"interval_s": 0.25}, "schedule.interval"),
        ({"interval_s": 5.0, "timezone": "Mars/Olympus"}, "schedule.timezone"),
        ({"cron": "* * * * *", "interval_s": 5.0}, "schedule: set either cron or interval"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(
    client: Client, options: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument, match=field):
        client.create_schedule(make_spec("square", [1]), **options)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"schedule\.spec\.name"):
        client.create_schedule(make_spec("", [1]), interval_s=5.0)
    assert client.schedules() == []
    for call in (client.delete_schedule, client.pause_schedule, client.resume_schedule):
        with pytest.raises(NotFound, match="schedule nope not found"):
            call("nope")


def test_ticks_missed_while_the_master_was_down_fire_once_not_as_a_burst(
    start_master: StartMaster, tmp_path: Path, queue_name: str
) -> None:
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    master = start_master(store=store)
    with master.client() as client:
        schedule = client.create_schedule(
            make_spec("square", [6], queue=queue_name), interval_s=1.0
        )
        wait_fired(client, schedule, 1)
    assert master.stop() == 0
    stopped_at = time.time()
    # The downtime is the scenario itself: several ticks pass with no master.
    poll(lambda: time.time() >= stopped_at + 4.5, 30, "four ticks to pass with no master")
    master = start_master(store=store, port=master.port)
    with master.client() as client:
        before = [t for t in ticks(fired(client, schedule)) if t <= stopped_at]
        wait_fired(client, schedule, len(before) + 2)
        after = [t for t in ticks(fired(client, schedule)) if t > stopped_at]
    # The first tick fired after the restart is the latest one that had passed by
    # then: the four or more before it never fire, so there was no burst.
    assert after[0] - before[-1] >= 4.0, (before, after)
    assert [b - a for a, b in itertools.pairwise(after)] == pytest.approx([1.0] * (len(after) - 1))


@pytest.fixture
def db() -> Iterator[str]:
    with pg.database() as url:
        yield url


def test_two_masters_on_postgres_never_fire_a_tick_twice(
    db: str, start_master: StartMaster, queue_name: str
) -> None:
    a, b = (start_master(store=db) for _ in range(2))
    with a.client() as client_a, b.client() as client_b:
        created = [
            client.create_schedule(make_spec("square", [n], queue=queue_name), interval_s=1.0)
            for n, client in enumerate((client_a, client_b, client_a, client_b))
        ]
        for schedule in created:
            wait_fired(client_b, schedule, 4)
        for schedule in created:
            client_a.delete_schedule(schedule.id)
        for schedule in created:
            tasks = fired(client_a, schedule)
            assert len(set(ticks(tasks))) == len(tasks), ticks(tasks)
            gaps = [b - a for a, b in itertools.pairwise(ticks(tasks))]
            assert all(gap >= 1.0 for gap in gaps), gaps


def test_the_cli_adds_lists_pauses_resumes_and_deletes_schedules(
    master: MasterProc, queue_name: str
) -> None:
    env = {"TASKFLEET_MASTER": master.address}
    added = json.loads(
        ok(
            run(
                *("schedule", "add", "square", "5", "--every-s", "60", "--queue", queue_name),
                *("--meta", "team=ops", "--json"),
                env=env,
            )
        )
    )
    schedule_id = added["id"]
    assert (added["interval_s"], added["queue"], added["paused"]) == (60.0, queue_name, False)
    cron_id = ok(
        run(*("schedule", "add", "square", "--cron", "30 2 * * *"), "--skip-missed", env=env)
    ).strip()

    table = ok(run("schedule", "list", env=env))
    assert schedule_id in table and "every 60 s" in table and "cron 30 2 * * * UTC" in table
    assert ok(run("schedule", "pause", schedule_id, env=env)).strip() == schedule_id
    listed = [
        json.loads(line) for line in ok(run("schedule", "list", "--json", env=env)).splitlines()
    ]
    assert {s["id"]: s["paused"] for s in listed} == {schedule_id: True, cron_id: False}
    assert {s["missed_ticks"] for s in listed} == {"FIRE_ONCE", "SKIP"}
    ok(run("schedule", "resume", schedule_id, env=env))
    with master.client() as client:
        (schedule,) = [s for s in client.schedules() if s.id == schedule_id]
        assert not schedule.paused and schedule.spec.metadata == {"team": "ops"}

    refused(run("schedule", "delete", schedule_id, "nope", env=env), "nope", code=2)
    ok(run("schedule", "delete", cron_id, env=env))
    assert ok(run("schedule", "list", "--json", env=env)) == ""
    refused(
        run("schedule", "add", "square", "--cron", "not cron", env=env), "schedule.cron", code=2
    )
    refused(
        run(*("schedule", "add", "square", "--every-s", "5", "--timezone", "Nowhere"), env=env),
        "schedule.timezone",
        code=2,
    )
    refused(run("schedule", "add", "square", env=env), "--cron", "--every-s", code=2)
