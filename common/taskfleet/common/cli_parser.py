"""The ``taskfleet`` command line: every command, its flags and arguments.

Each flag goes through ``EnvDefaultsParser.add_flag``, so it also reads its
``TASKFLEET_*`` variable; what the commands do is in ``cli``, ``cli_operate`` and ``cli_schedule``.
"""

from __future__ import annotations

import argparse
from typing import Any

from taskfleet.common import flags
from taskfleet.common.config import MasterConfig
from taskfleet.common.config_flags import add_client_flags, add_master_flags, add_worker_flags
from taskfleet.common.model import INT32_MAX, INT32_MIN, TaskState

DEFAULT_LIMIT = 20  # tasks `list` shows


def build_parser() -> flags.EnvDefaultsParser:
    parser = flags.EnvDefaultsParser(prog="taskfleet", description="A distributed task queue.")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=flags.EnvDefaultsParser
    )

    master = commands.add_parser("master", help="run the master")
    add_master_flags(master)

    worker = commands.add_parser("worker", help="run a worker")
    add_worker_flags(worker)

    submit = commands.add_parser(
        "submit",
        help="submit a task (or many with --from-stdin)",
        description="Submit a task. With --from-stdin, submit one task per line of stdin.",
    )
    add_client_flags(submit)
    text = flags.utf8_text
    submit.add_argument("name", type=text, help="registered task name")
    submit.add_argument(
        "args",
        nargs="*",
        type=text,
        metavar="JSON-ARG",
        help="positional arguments, each JSON (a bare word is taken as a string)",
    )
    add_spec_flags(submit)
    submit.add_flag(
        "--delay-s", type=flags.delay_float, help="do not start before this many seconds from now"
    )
    submit.add_flag(
        "--expires-s",
        type=flags.delay_float,
        help="if not started within this many seconds, end CANCELLED (Expired) instead",
    )
    submit.add_flag("--idempotency-key", type=text, default="", help="dedupe repeated submits")
    submit.add_flag(
        "--max-payload-bytes",
        default=MasterConfig().max_payload_bytes,
        type=flags.non_negative_int,
        help="refuse, before creating any task, payloads larger than this (the master's "
        "own limit, which has the same flag and environment variable, still applies)",
    )
    submit.add_flag(
        "--from-stdin",
        action="store_true",
        help="submit one task per non-blank stdin line, each a JSON array of positional "
        'arguments, an object {"args": [...], "kwargs": {...}}, or any other JSON value as '
        "the one argument; JSON-ARGs and --kwarg given here are shared by all (line "
        "arguments come after them). Every line is checked before any task is created. "
        "Prints one id per line, in input order, as each batch is created; with "
        "--idempotency-key K, line N gets the key K:N",
    )
    submit.add_flag(
        "--wait",
        action="store_true",
        help="wait for the results and print them (in input order; failures on stderr); "
        "the ids go to stderr as they are created",
    )
    submit.add_flag(
        "--wait-timeout-s", type=flags.positive_float, help="give up waiting after this long"
    )

    get = commands.add_parser("get", help="show a task")
    add_client_flags(get)
    get.add_argument("task_id", type=flags.utf8_text, metavar="ID")

    wait = commands.add_parser("wait", help="wait for tasks to finish")
    add_client_flags(wait)
    wait.add_argument("task_ids", nargs="+", type=flags.utf8_text, metavar="ID")
    # TASKFLEET_TIMEOUT_S is submit's limit on a task's run; giving up on a wait
    # is submit's --wait-timeout-s.
    wait.add_flag(
        "--timeout-s",
        type=flags.positive_float,
        env="TASKFLEET_WAIT_TIMEOUT_S",
        help="give up after this long",
    )
    wait.add_flag(
        "--progress",
        action="store_true",
        help='also print a line ("ID RUNNING 50%% MESSAGE", or JSON with --json) for '
        "each progress update of a task while it runs",
    )

    cancel = commands.add_parser("cancel", help="cancel a task")
    add_client_flags(cancel)
    cancel.add_argument("task_id", type=flags.utf8_text, metavar="ID")

    stats = commands.add_parser("stats", help="show queues and workers")
    add_client_flags(stats)
    _add_operator_commands(commands)
    _add_schedule_commands(commands)
    return parser


def add_spec_flags(parser: flags.EnvDefaultsParser) -> None:
    """The flags of the task a command submits (``submit``, ``schedule add``)."""
    parser.add_flag(
        "--kwarg",
        action="append",
        type=flags.utf8_text,
        metavar="KEY=JSON",
        help="keyword argument (repeatable)",
    )
    parser.add_flag("--queue", type=flags.utf8_text, default="default", help="queue name")
    parser.add_flag(
        "--priority",
        type=flags.int_in_range(INT32_MIN, INT32_MAX),
        default=0,
        help="higher runs first",
    )
    parser.add_flag(
        "--max-attempts",
        type=flags.int_in_range(0, INT32_MAX),
        default=0,
        help="attempts before FAILED (0: the task's default)",
    )
    parser.add_flag("--timeout-s", type=flags.positive_float, help="hard time limit")
    parser.add_flag(
        "--meta",
        action="append",
        type=flags.utf8_text,
        metavar="KEY=VALUE",
        help="metadata label (repeatable)",
    )
    parser.add_flag(
        "--concurrency-key",
        type=flags.utf8_text,
        default="",
        help="run at most --concurrency-limit tasks of this key at once, across all workers",
    )
    parser.add_flag(
        "--concurrency-limit",
        type=flags.int_in_range(1, INT32_MAX),
        help="tasks of --concurrency-key that may run at once (default 1)",
    )


def _add_operator_commands(commands: Any) -> None:
    """Add ``list``, ``retry`` and ``purge`` to the CLI's subcommands."""
    listing = commands.add_parser("list", help="list tasks, newest first")
    add_client_flags(listing)
    _add_filters(listing, "only tasks in these states (e.g. failed,cancelled)")
    listing.add_flag("--name", default="", type=flags.utf8_text, help="only tasks of this name")
    listing.add_flag(
        "--limit",
        default=DEFAULT_LIMIT,
        type=flags.int_in_range(1, INT32_MAX),
        help="show at most this many",
    )

    retry = commands.add_parser("retry", help="run FAILED or CANCELLED tasks again")
    add_client_flags(retry)
    retry.add_argument("task_ids", nargs="+", type=flags.utf8_text, metavar="ID")

    purge = commands.add_parser("purge", help="delete finished tasks now")
    add_client_flags(purge)
    _add_filters(purge, "only tasks in these final states (default: all three)")
    purge.add_flag(
        "--yes", action="store_true", help="do not ask for confirmation (needed off a terminal)"
    )


def _add_schedule_commands(commands: Any) -> None:
    """Add ``schedule add|list|delete|pause|resume`` (run by cli_schedule)."""
    schedule = commands.add_parser("schedule", help="submit a task on a cron or an interval")
    actions = schedule.add_subparsers(
        dest="schedule_command", required=True, parser_class=flags.EnvDefaultsParser
    )
    add = actions.add_parser(
        "add",
        help="create a schedule",
        description="Create a schedule that submits the task NAME(JSON-ARGs) on each tick. "
        "Each tick fires once, however many masters share the store; after downtime "
        "the latest missed tick fires once (or, with --skip-missed, not at all).",
    )
    add_client_flags(add)
    add.add_argument("name", type=flags.utf8_text, help="registered task name")
    add.add_argument(
        "args",
        nargs="*",
        type=flags.utf8_text,
        metavar="JSON-ARG",
        help="positional arguments, each JSON (a bare word is taken as a string)",
    )
    add_spec_flags(add)
    add.add_flag(
        "--cron",
        default="",
        type=flags.utf8_text,
        help='five-field cron expression, e.g. "30 2 * * *" (either this or --every-s)',
    )
    add.add_flag(
        "--every-s", default=0.0, type=flags.positive_float, help="fire every this many seconds"
    )
    add.add_flag(
        "--timezone",
        default="UTC",
        type=flags.utf8_text,
        help="IANA time zone --cron is read in, e.g. Europe/Berlin (DST-aware)",
    )
    add.add_flag(
        "--skip-missed",
        action="store_true",
        help="skip ticks over 10 s late (after downtime) instead of firing the latest once",
    )
    listing = actions.add_parser("list", help="list schedules with their next and last tick")
    add_client_flags(listing)
    for action, text in (
        ("delete", "delete schedules"),
        ("pause", "stop schedules firing"),
        ("resume", "let paused schedules fire again, from their next tick"),
    ):
        command = actions.add_parser(action, help=text)
        add_client_flags(command)
        command.add_argument("schedule_ids", nargs="+", type=flags.utf8_text, metavar="ID")


def _add_filters(parser: flags.EnvDefaultsParser, states_help: str) -> None:
    parser.add_flag("--queue", default="", type=flags.utf8_text, help="only tasks of this queue")
    parser.add_flag("--state", default=(), type=_states, help=states_help)


def _states(text: str) -> tuple[TaskState, ...]:
    names = flags.comma_list(text)
    try:
        return tuple(TaskState[name.upper()] for name in names)
    except KeyError:
        choices = ",".join(s.name.lower() for s in TaskState)
        raise argparse.ArgumentTypeError(f"must be states from {choices}, got {text!r}") from None
