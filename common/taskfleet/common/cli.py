"""The ``taskfleet`` command: master, worker, submit, get, wait, cancel, stats,
and the operator's list, retry and purge (in cli_operate). Its flags are in
cli_parser, what it prints in cli_output and terminal.

Readable output by default, ``--json`` for scripts; on a terminal, waiting for
several tasks shows a progress bar (on stderr) and ``stats`` shows rich tables,
while pipes and files get the same plain lines as always. Bad input (a bad flag, a
request the master refuses as INVALID_ARGUMENT, an unknown task id) is one line
on stderr and exit status 2; a task that ends FAILED or CANCELLED under
``--wait``/``wait``, an unreachable master and other errors give exit status 1;
never a traceback. Output into a pipe that closes early (``| head -1``) ends
the command quietly with status 141, as SIGPIPE ends a Unix tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import taskfleet.common.grpc_logs  # noqa: F401 - first: it must run before grpc is imported
from taskfleet.common import cli_operate, cli_schedule
from taskfleet.common.addresses import parse_address_list
from taskfleet.common.cli_output import (
    outcome_text,
    print_result,
    print_task_fields,
    show_stats,
    stats_json,
    task_json,
)
from taskfleet.common.cli_parser import build_parser
from taskfleet.common.cli_submit import (
    Call,
    check_specs,
    json_or_word,
    key_value,
    read_calls,
    spec_options,
    submit_in_batches,
)
from taskfleet.common.client import Client, make_spec
from taskfleet.common.config_flags import master_config, worker_config
from taskfleet.common.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    TaskfleetError,
    Unauthenticated,
    Unavailable,
)
from taskfleet.common.logs import setup_logging
from taskfleet.common.model import PendingName, Task, TaskProgress, TaskState
from taskfleet.common.waits import OnProgress

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool cut off by `head`


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at exit
        return status
    except BrokenPipeError:
        # The reader has gone: stop quietly, and keep the interpreter's last
        # flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Unavailable as exc:
        where = getattr(args, "master", "")
        which = "any master of" if "," in where else "the master at"
        print(
            f"taskfleet {args.command}: error: cannot reach {which} {where}: {exc}",
            file=sys.stderr,
        )
        return EXIT_TASK_FAILED
    except Unauthenticated as exc:
        print(
            f"taskfleet {args.command}: error: the master at {getattr(args, 'master', '')} "
            f"refused the call: {exc} (set --token or TASKFLEET_TOKEN)",
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

        master = master_config(args)
        setup_logging(master.log_level, master.log_format)
        return run_master(master)
    if args.command == "worker":
        from taskfleet.worker.main import run_worker

        worker = worker_config(args)
        setup_logging(worker.log_level, worker.log_format)
        return run_worker(worker)
    with Client(
        ",".join(parse_address_list("--master", args.master)),
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    ) as client:
        return COMMANDS[args.command](client, args)


def _submit(client: Client, args: argparse.Namespace) -> int:
    import time

    shared_args = [json_or_word(a) for a in args.args]
    shared_kwargs = dict(key_value(kv, "--kwarg", json_or_word) for kv in args.kwarg)
    calls = read_calls(sys.stdin.buffer) if args.from_stdin else [Call(0, [], {})]
    now = time.time()
    not_before = now + args.delay_s if args.delay_s else None
    expires_at = now + args.expires_s if args.expires_s else None
    options = spec_options(args)
    try:
        specs = [
            make_spec(
                args.name,
                [*shared_args, *call.args],
                {**shared_kwargs, **call.kwargs},
                not_before=not_before,
                expires_at=expires_at,
                idempotency_key=f"{args.idempotency_key}:{n}"
                if args.idempotency_key and args.from_stdin
                else args.idempotency_key,
                **options,
            )
            for n, call in enumerate(calls, start=1)
        ]
    except RecursionError:
        raise ConfigError("arguments: JSON nested too deeply") from None
    check_specs(specs, calls, args.max_payload_bytes)

    def created(task_ids: list[str]) -> None:
        if args.wait:  # stdout is for the results; the ids must still outlive a failed wait
            print("\n".join(f"taskfleet: submitted {t}" for t in task_ids), file=sys.stderr)
        elif args.json:
            print("\n".join(json.dumps({"id": t}) for t in task_ids), flush=True)
        else:
            print("\n".join(task_ids), flush=True)

    task_ids = submit_in_batches(client, specs, calls, created)
    if task_ids:
        _warn_if_unserved(client, PendingName(args.queue, args.name, len(task_ids)))
    if not args.wait or not task_ids:
        return 0
    return _wait(client, task_ids, args.wait_timeout_s, args.json, result_only=True)


def _warn_if_unserved(client: Client, pending: PendingName) -> None:
    """A line on stderr when no connected worker takes these tasks: they are
    submitted all the same (workers may come later), but a typo in a name would
    otherwise wait unseen."""
    try:
        stats = client.stats()
    except TaskfleetError:
        return  # the submit went through; the warning is only a courtesy
    if dataclasses.replace(stats, pending_names=[pending]).unserved():
        print(
            f"taskfleet: warning: no connected worker takes {pending.name!r} on queue "
            f"{pending.queue!r}; the task waits until one does",
            file=sys.stderr,
        )


def _get(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.task_id)
    if args.json:
        print(json.dumps(task_json(task)))
    else:
        print_task_fields(task)
    return 0


def _wait_command(client: Client, args: argparse.Namespace) -> int:
    on_progress = None
    if args.progress:
        on_progress = _print_json_progress if args.json else _print_progress
    return _wait(
        client, args.task_ids, args.timeout_s, args.json, result_only=False, on_progress=on_progress
    )


def _print_progress(update: TaskProgress) -> None:
    line = f"{update.task_id} RUNNING {update.fraction:.0%} {update.message}"
    print(line.rstrip(), flush=True)


def _print_json_progress(update: TaskProgress) -> None:
    shown = {
        "id": update.task_id,
        "state": TaskState.RUNNING.name,
        "progress": update.fraction,
        "progress_message": update.message,
    }
    print(json.dumps(shown), flush=True)


def _wait(
    client: Client,
    task_ids: Sequence[str],
    timeout_s: float | None,
    as_json: bool,
    *,
    result_only: bool,
    on_progress: OnProgress | None = None,
) -> int:
    from taskfleet.common.terminal import WaitProgress, is_terminal

    status = 0
    seen: set[str] = set()
    # Results print in submission order: each waits here for those before it.
    in_order = iter(task_ids)
    next_id = next(in_order, None)
    held: dict[str, Task] = {}
    show_bar = len(task_ids) > 1 and is_terminal(sys.stderr)
    with WaitProgress(len(task_ids), enabled=show_bar) as progress:
        for task in client.wait(task_ids, timeout_s, on_progress=on_progress):
            seen.add(task.id)
            progress.finished(task.state)
            if task.state != TaskState.SUCCEEDED:
                status = EXIT_TASK_FAILED
            if as_json:
                print(json.dumps(task_json(task)), flush=True)
            elif result_only:
                held[task.id] = task
                while next_id is not None and next_id in held:
                    print_result(held.pop(next_id))
                    next_id = next(in_order, None)
            else:
                print(f"{task.id} {task.state.name} {outcome_text(task)}".rstrip(), flush=True)
    for task_id in [] if next_id is None else [next_id, *in_order]:
        if task_id in held:  # finished after one that timed out
            print_result(held.pop(task_id))
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
    stats = client.stats(pending_names=True)
    if args.json:
        print(json.dumps(stats_json(stats)))
        return 0
    show_stats(stats)
    return 0


COMMANDS = {
    "submit": _submit,
    "get": _get,
    "wait": _wait_command,
    "cancel": _cancel,
    "stats": _stats,
    **cli_operate.COMMANDS,
    **cli_schedule.COMMANDS,
}
