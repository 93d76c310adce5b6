"""The schedule part of the Store contract, run against every store, and the tick
arithmetic of master/schedules.py on a fake clock (times are passed in)."""

from __future__ import annotations

import dataclasses
import datetime
import threading
import zoneinfo

import pytest
import test_store_contract
from test_store_contract import NOW

from taskfleet.common.errors import InvalidArgument, NotFound
from taskfleet.common.model import (
    SCHEDULE_ID_KEY,
    SCHEDULE_TICK_KEY,
    MissedTicks,
    Schedule,
    TaskSpec,
    TaskState,
)
from taskfleet.master import schedules
from taskfleet.master.store import Store
from taskfleet.master.store.base import FiredTick

store = test_store_contract.store  # the fixture: every store
MAX_PAYLOAD_BYTES = 1 << 20
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def every(interval_s: float, **options: object) -> Schedule:
    spec = TaskSpec("tick", "q", metadata={"team": "ops"})
    return schedules.validated(
        Schedule("", spec, interval_s=interval_s, **options),  # type: ignore[arg-type]
        MAX_PAYLOAD_BYTES,
        NOW,
    )


def fire(store: Store, schedule: Schedule, now: float) -> str | None:
    """What the master's timer does for one due schedule."""
    plan = schedules.plan(schedule, now)
    fired = None
    if plan.tick is not None:
        fired = FiredTick(plan.tick, schedules.fired_spec(schedule, plan.tick))
    return store.fire_schedule(schedule.id, schedule.next_fire, plan.next_fire, fired, now)


def local(*fields: int) -> float:
    return datetime.datetime(*fields, tzinfo=BERLIN).timestamp()  # type: ignore[misc]


# -- the store ------------------------------------------------------------------


def test_a_schedule_is_stored_listed_paused_and_deleted(store: Store) -> None:
    first = store.add_schedule(every(60.0))
    second = store.add_schedule(
        schedules.validated(
            Schedule(
                "",
                TaskSpec("nightly", payload=b"\x00\xff", content_type="application/octet-stream"),
                cron="30 2 * * *",
                timezone="Europe/Berlin",
                missed=MissedTicks.SKIP,
            ),
            MAX_PAYLOAD_BYTES,
            NOW,
        )
    )

    assert first.id and second.id != first.id
    assert store.list_schedules() == [first, second]
    assert store.get_schedule(second.id) == second
    assert second.spec.payload == b"\x00\xff" and second.missed is MissedTicks.SKIP
    assert first.next_fire == NOW + 60.0
    assert store.next_schedule_fire() == min(first.next_fire, second.next_fire)

    paused = store.pause_schedule(first.id, True, first.next_fire)
    assert paused == dataclasses.replace(first, paused=True)
    assert store.due_schedules(NOW + 3600 * 48, 10) == [store.get_schedule(second.id)]

    store.delete_schedule(first.id)
    assert store.list_schedules() == [second]
    for call in (store.get_schedule, store.delete_schedule):
        with pytest.raises(NotFound, match=first.id):
            call(first.id)
    with pytest.raises(NotFound, match=first.id):
        store.pause_schedule(first.id, False, NOW)


def test_a_due_tick_submits_one_task_marked_with_the_schedule(store: Store) -> None:
    schedule = store.add_schedule(every(10.0))
    assert store.due_schedules(NOW + 9.9, 10) == []
    (due,) = store.due_schedules(NOW + 10.5, 10)

    task_id = fire(store, due, NOW + 10.5)
    again = fire(store, due, NOW + 10.6)  # the same tick, as a second master read it

    assert task_id is not None and again is None
    task = store.get(task_id)
    assert task.state is TaskState.PENDING and task.spec.name == "tick"
    assert task.spec.metadata == {
        "team": "ops",
        SCHEDULE_ID_KEY: schedule.id,
        SCHEDULE_TICK_KEY: "1970-01-12T13:46:50+00:00",
    }
    moved = store.get_schedule(schedule.id)
    assert (moved.last_fire, moved.next_fire) == (NOW + 10.0, NOW + 20.0)
    assert store.due_schedules(NOW + 19.0, 10) == []


def test_a_paused_or_deleted_schedule_fires_nothing(store: Store) -> None:
    paused = store.add_schedule(every(10.0))
    deleted = store.add_schedule(every(10.0))
    store.pause_schedule(paused.id, True, paused.next_fire)
    store.delete_schedule(deleted.id)

    assert fire(store, paused, NOW + 11) is None
    assert fire(store, deleted, NOW + 11) is None
    assert store.stats() == []


def test_racing_firers_fire_each_tick_once(store: Store) -> None:
    schedule = store.add_schedule(every(10.0))
    results: list[str | None] = []
    start = threading.Barrier(8)

    def racer() -> None:
        start.wait()
        results.append(fire(store, schedule, NOW + 10.5))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len([r for r in results if r is not None]) == 1
    assert sum(c.counts[TaskState.PENDING] for c in store.stats()) == 1


def test_after_downtime_missed_ticks_fire_once_or_are_skipped(store: Store) -> None:
    once = store.add_schedule(every(60.0))
    skip = store.add_schedule(every(60.0, missed=MissedTicks.SKIP))
    later = NOW + 6000.0 + 30.0  # a hundred ticks passed while no master ran

    assert fire(store, once, later) is not None
    assert fire(store, skip, later) is None  # its latest tick is 30 s late
    for moved in map(store.get_schedule, (once.id, skip.id)):
        assert moved.next_fire == NOW + 6060.0  # on time again, no burst
    assert store.get_schedule(once.id).last_fire == NOW + 6000.0
    assert store.get_schedule(skip.id).last_fire == 0.0
    assert sum(c.counts[TaskState.PENDING] for c in store.stats()) == 1

    on_time = store.get_schedule(skip.id)
    assert fire(store, on_time, NOW + 6060.0 + 2.0) is not None  # a little late still fires


# -- tick arithmetic -----------------------------------------------------------


def test_a_cron_tick_keeps_its_local_time_across_dst() -> None:
    nightly = Schedule("", TaskSpec("n"), cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Berlin, so 02:30 does not exist.
    before = local(2026, 3, 27, 12, 0)
    first = schedules.first_tick(nightly, before)
    assert first == local(2026, 3, 28, 2, 30)  # 01:30 UTC, winter time
    nightly = dataclasses.replace(nightly, next_fire=first)
    skipped_day = schedules.plan(nightly, first + 1).next_fire
    assert skipped_day == local(2026, 3, 29, 3, 0)  # the first time after the gap
    nightly = dataclasses.replace(nightly, next_fire=skipped_day)
    assert schedules.plan(nightly, skipped_day + 1).next_fire == local(2026, 3, 30, 2, 30)
    assert local(2026, 3, 30, 2, 30) - local(2026, 3, 28, 2, 30) == 47 * 3600  # summer time


def test_a_cron_schedule_after_downtime_fires_its_latest_tick_once() -> None:
    minutely = Schedule("", TaskSpec("m"), cron="* * * * *", next_fire=60.0 * 1000)
    plan = schedules.plan(minutely, 60.0 * 1500 + 7)
    assert plan == schedules.Plan(60.0 * 1500, 60.0 * 1501)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cron": "61 * * * *"}, "schedule.cron"),
        ({"cron": "every day"}, "schedule.cron"),
        ({"cron": "0 0 30 2 *"}, "schedule.cron: never fires"),
        ({"interval_s": 300_000_000_000.0}, "schedule.interval: the first tick"),
        ({"interval_s": 0.5}, "schedule.interval"),
        ({"interval_s": -3.0}, "schedule.interval"),
        ({"interval_s": 5.0, "timezone": "Mars/Olympus"}, "schedule.timezone"),
        ({"interval_s": 5.0, "timezone": "Europe"}, "schedule.timezone"),
        ({"interval_s": 5.0, "timezone": "a" * 5000}, "schedule.timezone"),
        ({"cron": "* * * * *", "interval_s": 5.0}, "schedule: set either"),
        ({}, "schedule: set either"),
        ({"interval_s": 5.0, "spec": TaskSpec("")}, "schedule.spec.name"),
        ({"interval_s": 5.0, "spec": TaskSpec("t", not_before=5.0)}, "schedule.spec.not_before"),
        (
            {"interval_s": 5.0, "spec": TaskSpec("t", idempotency_key="k")},
            "schedule.spec.idempotency_key",
        ),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(options: dict[str, object], field: str) -> None:
    schedule = Schedule("", TaskSpec("t"))
    with pytest.raises(InvalidArgument, match=f"^{field}"):
        schedules.validated(dataclasses.replace(schedule, **options), MAX_PAYLOAD_BYTES, NOW)
