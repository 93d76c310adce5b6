"""The ``taskfleet`` command: master, worker, submit, get, wait, cancel, stats.

Readable output by default, ``--json`` for scripts. Bad input (a bad flag, a
request the master refuses as INVALID_ARGUMENT, an unknown task id) is one line
on stderr and exit status 2; a task that ends FAILED or CANCELLED under
``--wait``/``wait``, an unreachable master and other errors give exit status 1;
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from taskfleet.common import config as cfg
from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.codec import decode_result
from taskfleet.common.context import setup_logging
from taskfleet.common.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    TaskFailed,
    TaskfleetError,
    Unavailable,
)
from taskfleet.common.model import Stats, Task, TaskState

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> cfg.EnvDefaultsParser:
    parser = cfg.EnvDefaultsParser(prog="taskfleet", description="A distributed task queue.")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=cfg.EnvDefaultsParser
    )

    master = commands.add_parser("master", help="run the master")
    cfg.add_master_flags(master)

    worker = commands.add_parser("worker", help="run a worker")
    cfg.add_worker_flags(worker)

    submit = commands.add_parser("submit", help="submit a task")
    cfg.add_client_flags(submit)
    submit.add_argument("name", help="registered task name")
    submit.add_argument(
        "args",
        nargs="*",
        metavar="JSON-ARG",
        help="positional arguments, each JSON (a bare word is taken as a string)",
    )
    submit.add_argument(
        "--kwarg",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="keyword argument (repeatable)",
    )
    submit.add_argument("--queue", default="default", help="queue name")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first")
    submit.add_argument(
        "--max-attempts",
        type=cfg.non_negative_int,
        default=0,
        help="attempts before FAILED (0: the task's default)",
    )
    submit.add_argument(
        "--timeout-s", type=cfg.positive_float, default=None, help="hard time limit"
    )
    submit.add_argument(
        "--delay-s",
        type=cfg.positive_float,
        default=None,
        help="do not start before this many seconds from now",
    )
    submit.add_argument("--idempotency-key", default="", help="dedupe repeated submits")
    submit.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata label (repeatable)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--wait-timeout-s",
        type=cfg.positive_float,
        default=None,
        help="give up waiting after this long",
    )

    get = commands.add_parser("get", help="show a task")
    cfg.add_client_flags(get)
    get.add_argument("task_id", metavar="ID")

    wait = commands.add_parser("wait", help="wait for tasks to finish")
    cfg.add_client_flags(wait)
    wait.add_argument("task_ids", nargs="+", metavar="ID")
    wait.add_argument(
        "--timeout-s", type=cfg.positive_float, default=None, help="give up after this long"
    )

    cancel = commands.add_parser("cancel", help="cancel a task")
    cfg.add_client_flags(cancel)
    cancel.add_argument("task_id", metavar="ID")

    stats = commands.add_parser("stats", help="show queues and workers")
    cfg.add_client_flags(stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Unavailable as exc:
        where = getattr(args, "master", "")
        print(
            f"taskfleet {args.command}: error: cannot reach the master at {where}: {exc}",
            file=sys.stderr,
        )
        return EXIT_TASK_FAILED
    except TaskfleetError as exc:
        print(f"taskfleet {args.command}: error: {exc}", file=sys.stderr)
        bad_input = isinstance(exc, ConfigError | InvalidArgument | NotFound)
        return EXIT_USAGE if bad_input or args.command in ("master", "worker") else EXIT_TASK_FAILED
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "master":
        from taskfleet.master.server import run_master

        master_config = cfg.master_config(args)
        setup_logging(master_config.log_level, master_config.log_format)
        return run_master(master_config)
    if args.command == "worker":
        from taskfleet.worker.main import run_worker

        worker_config = cfg.worker_config(args)
        setup_logging(worker_config.log_level, worker_config.log_format)
        return run_worker(worker_config)
    cfg.check_address("--master", args.master)
    with Client(args.master, token=args.token) as client:
        return COMMANDS[args.command](client, args)


def _submit(client: Client, args: argparse.Namespace) -> int:
    import time

    spec = make_spec(
        args.name,
        [_json_or_word(a) for a in args.args],
        dict(_key_value(kv, "--kwarg", _json_or_word) for kv in args.kwarg),
        queue=args.queue,
        priority=args.priority,
        max_attempts=args.max_attempts,
        timeout_s=args.timeout_s or 0.0,
        not_before=time.time() + args.delay_s if args.delay_s else None,
        idempotency_key=args.idempotency_key,
        metadata=dict(_key_value(kv, "--meta", str) for kv in args.meta),
    )
    (task_id,) = client.submit_many([spec])
    if not args.wait:
        print(json.dumps({"id": task_id}) if args.json else task_id)
        return 0
    return _wait(client, [task_id], args.wait_timeout_s, args.json, result_only=True)


def _get(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.task_id)
    if args.json:
        print(json.dumps(task_json(task)))
    else:
        for key, value in task_json(task).items():
            if value not in (None, "", {}, 0) or key in ("state", "attempts"):
                print(f"{key:>12}: {value if isinstance(value, str) else json.dumps(value)}")
    return 0


def _wait_command(client: Client, args: argparse.Namespace) -> int:
    return _wait(client, args.task_ids, args.timeout_s, args.json, result_only=False)


def _wait(
    client: Client,
    task_ids: Sequence[str],
    timeout_s: float | None,
    as_json: bool,
    *,
    result_only: bool,
) -> int:
    status = 0
    seen = set()
    for task in client.wait(task_ids, timeout_s):
        seen.add(task.id)
        if task.state != TaskState.SUCCEEDED:
            status = EXIT_TASK_FAILED
        if as_json:
            print(json.dumps(task_json(task)), flush=True)
        elif result_only:
            try:
                print(_show(task_result(task)), flush=True)
            except TaskFailed as exc:
                print(f"taskfleet: {exc}", file=sys.stderr)
        else:
            print(f"{task.id} {task.state.name} {_outcome_text(task)}".rstrip(), flush=True)
    missing = [t for t in task_ids if t not in seen]
    if missing:
        print(
            f"taskfleet: timed out waiting for {len(missing)} task(s): {' '.join(missing)}",
            file=sys.stderr,
        )
        return EXIT_TASK_FAILED
    return status


def _cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(args.task_id)
    print(json.dumps(task_json(task)) if args.json else f"{task.id} {task.state.name}")
    return 0


def _stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        print(json.dumps(stats_json(stats)))
        return 0
    states = list(TaskState)
    rows = [["QUEUE", *(s.name for s in states)]]
    rows += [[q.queue, *(str(q.counts.get(s, 0)) for s in states)] for q in stats.queues]
    _print_table(rows)
    print()
    rows = [["WORKER", "HOST", "QUEUES", "SLOTS", "RUNNING"]]
    rows += [
        [w.worker_id, w.hostname, ",".join(w.queues), str(w.concurrency), str(w.running)]
        for w in stats.workers
    ]
    _print_table(rows)
    return 0


COMMANDS = {
    "submit": _submit,
    "get": _get,
    "wait": _wait_command,
    "cancel": _cancel,
    "stats": _stats,
}


def task_json(task: Task) -> dict[str, Any]:
    """A task as plain JSON for ``--json`` output (the result decoded)."""
    result: Any = None
    if task.state == TaskState.SUCCEEDED:
        result = decode_result(task.result, task.result_content_type)
        if isinstance(result, bytes):
            result = result.decode(errors="replace")
    return {
        "id": task.id,
        "name": task.spec.name,
        "queue": task.spec.queue,
        "state": task.state.name,
        "attempts": task.attempts,
        "result": result,
        "error": None
        if task.error is None
        else {
            "type": task.error.type,
            "message": task.error.message,
            "traceback": task.error.traceback,
        },
        "worker_id": task.worker_id,
        "metadata": task.spec.metadata,
        "priority": task.spec.priority,
        "max_attempts": task.spec.max_attempts,
        "timeout_s": task.spec.timeout_s,
        "not_before": task.spec.not_before,
        "idempotency_key": task.spec.idempotency_key,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }


def stats_json(stats: Stats) -> dict[str, Any]:
    return {
        "queues": [
            {"queue": q.queue, **{s.name.lower(): q.counts.get(s, 0) for s in TaskState}}
            for q in stats.queues
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "hostname": w.hostname,
                "pid": w.pid,
                "queues": list(w.queues),
                "task_names": list(w.task_names),
                "concurrency": w.concurrency,
                "running": w.running,
                "peer": w.peer,
            }
            for w in stats.workers
        ],
    }


def _outcome_text(task: Task) -> str:
    if task.state == TaskState.SUCCEEDED:
        return _show(decode_result(task.result, task.result_content_type))
    if task.error is not None:
        return f"{task.error.type}: {task.error.message}"
    return ""


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json_or_word(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_value(text: str, flag: str, parse: Any) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag}: expected KEY=VALUE, got {text!r}")
    return key, parse(value)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
