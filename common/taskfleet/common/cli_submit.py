"""``taskfleet submit``: build every task first, then create them batch by batch.

Everything the client can check is checked for every input line before the
first task exists (JSON, shape, UTF-8, payload size), so bad input creates
nothing. The master stays the authority: if it refuses a later batch, the
error names the input line, and the ids of the batches already created have
been printed, so nothing is orphaned and a rerun can skip them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from taskfleet.common.client import Client
from taskfleet.common.errors import ConfigError, TaskfleetError
from taskfleet.common.frozen import frozen
from taskfleet.common.model import TaskSpec

_TASK_FIELD = re.compile(r"\btasks\[(\d+)\]\.?")


@frozen
class Call:
    """The arguments of one task, and the input line they came from (0: the command line)."""

    line: int
    args: list[Any]
    kwargs: dict[str, Any]


def read_calls(stream: BinaryIO) -> list[Call]:
    """The call of each non-blank line of ``stream``, for ``--from-stdin``: a JSON
    array is the positional arguments, an object ``{"args", "kwargs"}`` both, any
    other JSON value the one argument."""
    calls: list[Call] = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"--from-stdin: line {number} is not UTF-8 text") from None
        if not line.strip():
            continue
        value = parse_json(line, f"--from-stdin: line {number}")
        if isinstance(value, list):
            calls.append(Call(number, value, {}))
        elif isinstance(value, dict) and value and set(value) <= {"args", "kwargs"}:
            line_args, line_kwargs = value.get("args", []), value.get("kwargs", {})
            if not isinstance(line_args, list) or not isinstance(line_kwargs, dict):
                raise ConfigError(
                    f"--from-stdin: line {number}: args must be an array, kwargs an object"
                )
            calls.append(Call(number, line_args, line_kwargs))
        else:
            calls.append(Call(number, [value], {}))
    return calls


def parse_json(text: str, where: str) -> Any:
    """``text`` as JSON; ConfigError naming ``where`` if it is not."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None


def check_specs(specs: Sequence[TaskSpec], calls: Sequence[Call], max_payload_bytes: int) -> None:
    """Refuse, naming the input line, a payload the master would refuse for its size.

    The limit is the master's default (or the client's ``--max-payload-bytes``):
    a master configured lower still refuses, and ``submit_in_batches`` then
    names the line.
    """
    for spec, call in zip(specs, calls, strict=True):
        if len(spec.payload) > max_payload_bytes:
            raise ConfigError(
                f"{_where(call.line)}payload: {len(spec.payload)} bytes is over the limit of "
                f"{max_payload_bytes} (--max-payload-bytes); put large data on shared storage "
                "and pass its path or URL instead"
            )


def submit_in_batches(
    client: Client,
    specs: Sequence[TaskSpec],
    calls: Sequence[Call],
    on_created: Callable[[list[str]], None],
) -> list[str]:
    """Create the tasks batch by batch, handing each batch's ids to ``on_created``
    before the next batch is sent; an error names the input line and says how
    many tasks exist already."""
    task_ids: list[str] = []
    try:
        for batch_ids in client.submit_batches(specs):
            task_ids += batch_ids
            on_created(batch_ids)
    except TaskfleetError as exc:
        # The batch that failed starts after the tasks created so far.
        def line_of(match: re.Match[str]) -> str:
            index = len(task_ids) + int(match[1])
            return _where(calls[index].line) if index < len(calls) else match[0]

        message = _TASK_FIELD.sub(line_of, str(exc))
        if task_ids:
            message += (
                f" ({len(task_ids)} task(s) were created before this, their ids printed; "
                f"from line {calls[len(task_ids)].line} on, nothing was submitted)"
            )
        raise type(exc)(message) from None
    return task_ids


def spec_options(args: argparse.Namespace) -> dict[str, Any]:
    """``make_spec``'s options from the flags of ``cli_parser.add_spec_flags``."""
    if args.concurrency_limit is not None and not args.concurrency_key:
        raise ConfigError("--concurrency-limit: needs --concurrency-key")
    return {
        "queue": args.queue,
        "priority": args.priority,
        "max_attempts": args.max_attempts,
        "timeout_s": args.timeout_s or 0.0,
        "metadata": dict(key_value(kv, "--meta", str) for kv in args.meta),
        "concurrency_key": args.concurrency_key,
        "concurrency_limit": args.concurrency_limit,
    }


def _where(line: int) -> str:
    return f"--from-stdin: line {line}: " if line else ""


def json_or_word(text: str) -> Any:
    """A command-line argument as JSON, or as the string itself when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise ConfigError(f"{text[:20]}...: JSON nested too deeply") from None


def key_value(text: str, flag: str, parse: Any) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``flag`` split, the value read by ``parse``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag}: expected KEY=VALUE, got {text!r}")
    return key, parse(value)
