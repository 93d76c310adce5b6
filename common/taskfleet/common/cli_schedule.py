"""``taskfleet schedule add|list|delete|pause|resume``: tasks submitted on a cron
expression or an interval, by the master (its flags are in cli_parser)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from taskfleet.common.calls import make_spec
from taskfleet.common.cli_output import iso_time, print_table
from taskfleet.common.cli_submit import json_or_word, key_value, spec_options
from taskfleet.common.client import Client
from taskfleet.common.errors import ConfigError, NotFound
from taskfleet.common.model import MissedTicks, Schedule

EXIT_REFUSED = 2


def schedule_command(client: Client, args: argparse.Namespace) -> int:
    return _ACTIONS[args.schedule_command](client, args)


def _add(client: Client, args: argparse.Namespace) -> int:
    if bool(args.cron) == bool(args.every_s):
        raise ConfigError("--cron, --every-s: give exactly one")
    try:
        spec = make_spec(
            args.name,
            [json_or_word(a) for a in args.args],
            dict(key_value(kv, "--kwarg", json_or_word) for kv in args.kwarg),
            **spec_options(args),
        )
    except RecursionError:
        raise ConfigError("arguments: JSON nested too deeply") from None
    schedule = client.create_schedule(
        spec,
        cron=args.cron,
        interval_s=args.every_s,
        timezone=args.timezone,
        missed=MissedTicks.SKIP if args.skip_missed else MissedTicks.FIRE_ONCE,
    )
    print(json.dumps(schedule_json(schedule)) if args.json else schedule.id)
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    found = client.schedules()
    if args.json:
        for schedule in found:
            print(json.dumps(schedule_json(schedule)))
        return 0
    rows = [["ID", "WHEN", "NAME", "QUEUE", "STATE", "NEXT", "LAST"]]
    for s in found:
        when = f"cron {s.cron} {s.timezone}" if s.cron else f"every {s.interval_s:g} s"
        rows.append(
            [
                s.id,
                when,
                s.spec.name,
                s.spec.queue,
                "paused" if s.paused else "active",
                "-" if s.paused else iso_time(s.next_fire, local=True) or "-",
                iso_time(s.last_fire, local=True) or "-",
            ]
        )
    print_table(rows)
    return 0


def _each(client: Client, args: argparse.Namespace) -> int:
    """Delete, pause or resume each id; an unknown one does not stop the others,
    and makes the exit status 2."""
    status = 0
    for schedule_id in dict.fromkeys(args.schedule_ids):
        try:
            if args.schedule_command == "delete":
                client.delete_schedule(schedule_id)
            elif args.schedule_command == "pause":
                client.pause_schedule(schedule_id)
            else:
                client.resume_schedule(schedule_id)
        except NotFound as exc:
            print(f"taskfleet schedule: error: {exc}", file=sys.stderr)
            status = EXIT_REFUSED
            continue
        print(json.dumps({"id": schedule_id}) if args.json else schedule_id)
    return status


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """A schedule as plain JSON for ``--json`` output (times ISO 8601 in UTC)."""
    return {
        "id": schedule.id,
        "name": schedule.spec.name,
        "queue": schedule.spec.queue,
        "cron": schedule.cron,
        "interval_s": schedule.interval_s,
        "timezone": schedule.timezone,
        "paused": schedule.paused,
        "missed_ticks": schedule.missed.name,
        "next_fire": iso_time(schedule.next_fire),
        "last_fire": iso_time(schedule.last_fire),
        "created_at": iso_time(schedule.created_at),
    }


_ACTIONS = {"add": _add, "list": _list, "delete": _each, "pause": _each, "resume": _each}
COMMANDS = {"schedule": schedule_command}
