"""The operator's commands: ``list``, ``retry`` and ``purge`` (ListTasks,
RetryTask and PurgeTasks), for looking at what failed, running it again after a
fix, and clearing it out."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any

from taskfleet.common import config as cfg
from taskfleet.common.cli_output import print_table, task_json
from taskfleet.common.client import Client
from taskfleet.common.errors import ConfigError, FailedPrecondition, NotFound
from taskfleet.common.model import INT32_MAX, Task, TaskState

EXIT_REFUSED = 2
DEFAULT_LIMIT = 20
_FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


def add_commands(commands: Any) -> None:
    """Add ``list``, ``retry`` and ``purge`` to the CLI's subcommands."""
    listing = commands.add_parser("list", help="list tasks, newest first")
    cfg.add_client_flags(listing)
    _add_filters(listing, "only tasks in these states (e.g. failed,cancelled)")
    listing.add_flag("--name", default="", type=cfg.utf8_text, help="only tasks of this name")
    listing.add_flag(
        "--limit",
        default=DEFAULT_LIMIT,
        type=cfg.int_in_range(1, INT32_MAX),
        help="show at most this many",
    )

    retry = commands.add_parser("retry", help="run FAILED or CANCELLED tasks again")
    cfg.add_client_flags(retry)
    retry.add_argument("task_ids", nargs="+", type=cfg.utf8_text, metavar="ID")

    purge = commands.add_parser("purge", help="delete finished tasks now")
    cfg.add_client_flags(purge)
    _add_filters(purge, "only tasks in these final states (default: all three)")
    purge.add_flag(
        "--yes", action="store_true", help="do not ask for confirmation (needed off a terminal)"
    )


def _add_filters(parser: cfg.EnvDefaultsParser, states_help: str) -> None:
    parser.add_flag("--queue", default="", type=cfg.utf8_text, help="only tasks of this queue")
    parser.add_flag("--state", default=(), type=_states, help=states_help)


def _states(text: str) -> tuple[TaskState, ...]:
    names = cfg.comma_list(text)
    try:
        return tuple(TaskState[name.upper()] for name in names)
    except KeyError:
        choices = ",".join(s.name.lower() for s in TaskState)
        raise argparse.ArgumentTypeError(f"must be states from {choices}, got {text!r}") from None


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
    rows += [_row(task) for task in shown]
    print_table(rows)
    return 0


def _row(task: Task) -> list[str]:
    when = task.finished_at or task.started_at or task.created_at
    stamp = dt.datetime.fromtimestamp(when).isoformat(sep=" ", timespec="seconds")
    error = f"{task.error.type}: {task.error.message}" if task.error else ""
    return [
        task.id,
        task.state.name,
        task.spec.name,
        task.spec.queue,
        str(task.attempts),
        stamp,
        error.splitlines()[0][:80] if error else "",
    ]


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
