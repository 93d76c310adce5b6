"""The operator's commands: ``list``, ``retry`` and ``purge`` (ListTasks,
RetryTask and PurgeTasks), for looking at what failed, running it again after a
fix, and clearing it out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from taskfleet.common.cli_output import print_table, task_json, task_row
from taskfleet.common.client import Client
from taskfleet.common.errors import ConfigError, FailedPrecondition, NotFound
from taskfleet.common.model import TaskState

EXIT_REFUSED = 2
_FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


def list_command(client: Client, args: argparse.Namespace) -> int:
    tasks = client.list_tasks(
        queue=args.queue, name=args.name, states=args.state, page_size=min(args.limit, 1000)
    )
    shown = []
    for task in tasks:
        shown.append(task)
        if len(shown) == args.limit:
            break
    if args.json:
        for task in shown:
            print(json.dumps(task_json(task)))
        return 0
    rows = [["ID", "STATE", "NAME", "QUEUE", "ATTEMPTS", "WHEN", "ERROR"]]
    rows += [task_row(task) for task in shown]
    print_table(rows)
    return 0


def retry_command(client: Client, args: argparse.Namespace) -> int:
    """Retry each id; one refused (unknown, or not FAILED/CANCELLED) does not stop
    the others, and makes the exit status 2."""
    status = 0
    for task_id in dict.fromkeys(args.task_ids):
        try:
            task = client.retry(task_id)
        except (NotFound, FailedPrecondition) as exc:
            print(f"taskfleet retry: error: {exc}", file=sys.stderr)
            status = EXIT_REFUSED
            continue
        print(json.dumps({"id": task.id, "state": task.state.name}) if args.json else task_id)
    return status


def purge_command(
    client: Client, args: argparse.Namespace, ask: Callable[[str], str] = input
) -> int:
    states = args.state or _FINAL
    live = [s.name for s in states if s not in _FINAL]
    if live:
        raise ConfigError(f"--state: only finished tasks can be purged, not {','.join(live)}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("--yes: needed to purge without a terminal to confirm on")
        count = sum(
            q.counts.get(s, 0)
            for q in client.stats().queues
            if not args.queue or q.queue == args.queue
            for s in states
        )
        where = f"queue {args.queue}" if args.queue else "every queue"
        which = ",".join(s.name for s in states)
        answer = ask(f"Delete {count} {which} tasks of {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    deleted = client.purge(queue=args.queue, states=states)
    print(json.dumps({"deleted": deleted}) if args.json else f"deleted {deleted} tasks")
    return 0


COMMANDS = {"list": list_command, "retry": retry_command, "purge": purge_command}
