"""When a schedule's ticks fall, and what a tick submits; no store, no clock.

Times are unix seconds (UTC). A cron expression is read in the schedule's
IANA time zone, so a daily tick at 02:30 stays at 02:30 local time across DST
changes (a local time that a DST change skips fires at the first time after
it, one that repeats fires once). An interval schedule's ticks fall every
``interval_s`` from its creation, whatever the time zone.

Missed ticks: when the schedule's master was stopped (or the database away)
over several ticks, ``plan`` fires only the latest of them, once, and moves on
to the first tick after now: never a burst. With ``MissedTicks.SKIP`` a tick
more than ``MISSED_AFTER_S`` late is not fired at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import zoneinfo

from croniter import CroniterError, croniter

from taskfleet.common.errors import InvalidArgument, ResourceExhausted
from taskfleet.common.frozen import frozen
from taskfleet.common.model import (
    MAX_DURATION_S,
    MAX_UNIX_S,
    SCHEDULE_ID_KEY,
    SCHEDULE_TICK_KEY,
    MissedTicks,
    Schedule,
    TaskSpec,
)
from taskfleet.master.validation import validate_specs

# Shorter intervals would make the store's transaction the whole job of a master.
MIN_INTERVAL_S = 1.0
# A tick later than this counts as missed for MissedTicks.SKIP: long enough for
# a busy master's loop, short enough that a restart after minutes skips.
MISSED_AFTER_S = 10.0


@frozen
class Plan:
    """What to do with a due schedule: fire ``tick`` (None: skip it) and move the
    schedule's next tick to ``next_fire``."""

    tick: float | None
    next_fire: float


def validated(schedule: Schedule, max_payload_bytes: int, now: float) -> Schedule:
    """``schedule`` checked and ready to store: its first tick set, created ``now``.

    Raises InvalidArgument naming the field (``schedule.cron``, ...)."""
    if bool(schedule.cron) == bool(schedule.interval_s):
        raise InvalidArgument("schedule: set either cron or interval (not both)")
    if schedule.interval_s and not MIN_INTERVAL_S <= schedule.interval_s <= MAX_DURATION_S:
        raise InvalidArgument(
            f"schedule.interval: must be at least {MIN_INTERVAL_S:g} s and at most "
            f"{MAX_DURATION_S} s, got {schedule.interval_s:g} s"
        )
    if schedule.cron and not croniter.is_valid(schedule.cron):
        raise InvalidArgument(f"schedule.cron: not a valid cron expression: {schedule.cron!r}")
    zone(schedule.timezone)
    spec = schedule.spec
    if spec.not_before:
        raise InvalidArgument("schedule.spec.not_before: a schedule's task runs at its tick")
    if spec.expires_at:
        raise InvalidArgument(
            "schedule.spec.expires_at: a time, which every tick after it would pass"
        )
    if spec.depends_on or spec.pass_results or spec.gather_results:
        raise InvalidArgument(
            "schedule.spec.depends_on: a schedule's task cannot wait for other tasks"
        )
    if spec.idempotency_key:
        raise InvalidArgument(
            "schedule.spec.idempotency_key: every tick submits a new task, so a key would "
            "make all ticks one task"
        )
    try:
        validate_specs([spec], max_payload_bytes)
    except (InvalidArgument, ResourceExhausted) as exc:
        raise type(exc)(str(exc).replace("tasks[0]", "schedule.spec", 1)) from None
    created = dataclasses.replace(
        schedule, id="", paused=False, next_fire=0.0, last_fire=0.0, created_at=now
    )
    try:
        next_fire = first_tick(created, now)
    except CroniterError:  # a valid expression for a day that never comes, as "0 0 30 2 *"
        raise InvalidArgument(f"schedule.cron: never fires: {schedule.cron!r}") from None
    if next_fire > MAX_UNIX_S:
        raise InvalidArgument("schedule.interval: the first tick would be after 9999-12-31")
    return dataclasses.replace(created, next_fire=next_fire)


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name``; InvalidArgument naming ``schedule.timezone``."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "a" * 5000
        raise InvalidArgument(
            f"schedule.timezone: not an IANA time zone name (like Europe/Berlin): {name!r}"
        ) from None


def first_tick(schedule: Schedule, now: float) -> float:
    """The first tick strictly after ``now``: where a new or resumed schedule starts."""
    if schedule.interval_s:
        if now < schedule.created_at + schedule.interval_s:
            return schedule.created_at + schedule.interval_s
        return _interval_ticks(schedule, schedule.created_at + schedule.interval_s, now)[1]
    return _cron_tick(schedule, now, forward=True)


def plan(schedule: Schedule, now: float) -> Plan:
    """How to fire ``schedule``, whose ``next_fire`` is due (at or before ``now``)."""
    if schedule.interval_s:
        latest, following = _interval_ticks(schedule, schedule.next_fire, now)
    else:
        latest = max(schedule.next_fire, _cron_tick(schedule, now, forward=False))
        following = _cron_tick(schedule, now, forward=True)
    late = schedule.missed is MissedTicks.SKIP and now - latest > MISSED_AFTER_S
    return Plan(None if late else latest, following)


def fired_spec(schedule: Schedule, tick: float) -> TaskSpec:
    """The task that ``tick`` of ``schedule`` submits, marked with both in its metadata."""
    stamp = datetime.datetime.fromtimestamp(tick, datetime.UTC).isoformat()
    metadata = {**schedule.spec.metadata, SCHEDULE_ID_KEY: schedule.id, SCHEDULE_TICK_KEY: stamp}
    return dataclasses.replace(schedule.spec, metadata=metadata)


def _interval_ticks(schedule: Schedule, anchor: float, now: float) -> tuple[float, float]:
    """The latest tick at or before ``now`` (not before ``anchor``, itself a tick)
    and the one after it."""
    periods = max(0, math.floor((now - anchor) / schedule.interval_s))
    latest = anchor + periods * schedule.interval_s
    return latest, latest + schedule.interval_s


def _cron_tick(schedule: Schedule, now: float, *, forward: bool) -> float:
    """The cron tick after ``now``, or the one before it."""
    start = datetime.datetime.fromtimestamp(now, zone(schedule.timezone))
    ticks = croniter(schedule.cron, start)
    tick = ticks.get_next(datetime.datetime) if forward else ticks.get_prev(datetime.datetime)
    return float(tick.timestamp())
