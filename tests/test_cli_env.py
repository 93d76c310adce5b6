"""Every flag of every command reads its ``TASKFLEET_*`` variable (DESIGN).

The flags are found in the parser itself, so a flag added later is covered
without touching this file; one case then checks the same through the console
script against a real master.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator

import pytest

from taskfleet.common.cli_parser import build_parser

from procs import MasterProc
from test_cli import ok, run

# Tried in order for a flag that takes a value: the first its type accepts and
# that differs from its default is set in the environment.
CANDIDATES = ("7", "0.5", "failed,cancelled", "127.0.0.1:6001", "k=1", "x")


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command by its words ("submit", "schedule add"), nested ones included."""
    commands = _subcommands(build_parser())
    if not commands:
        raise AssertionError("the CLI has no subcommands")
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                nested = _subcommands(sub)
                found.update({f"{word} {k}": v for k, v in nested.items()} or {word: sub})
    return found


def _flags() -> Iterator[tuple[str, str]]:
    for command, parser in _commands().items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield command, action.option_strings[0]


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def _env_value(action: argparse.Action) -> tuple[str, object]:
    """A valid non-default value for ``action`` as text, and as parsed."""
    if action.const is True:  # store_true
        return "true", True
    for text in action.choices or CANDIDATES:
        try:
            value = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, ValueError):
            continue
        if action.default == []:  # a repeatable flag: the variable is one item
            value = [value]
        if value != action.default and str(value) != str(action.default):
            return text, value
    raise AssertionError(f"no test value for {action.option_strings[0]}")


def _argv(parser: argparse.ArgumentParser, command: str, under_test: str) -> list[str]:
    """The command with something for each positional and each other required flag."""
    argv = command.split()
    for action in parser._actions:
        if not action.option_strings:
            argv.append("x")
        elif action.required and under_test not in action.option_strings:
            argv += [action.option_strings[0], "x"]
    return argv


def test_every_command_has_flags_to_check() -> None:
    commands = {command for command, _ in _flags()}
    assert {"master", "worker", "submit", "get", "wait", "cancel", "stats"} <= commands
    assert {"list", "retry", "purge"} <= commands
    assert {f"schedule {a}" for a in ("add", "list", "delete", "pause", "resume")} <= commands


@pytest.mark.parametrize(("command", "flag"), list(_flags()))
def test_every_flag_reads_its_variable(
    command: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("TASKFLEET_")]:
        monkeypatch.delenv(name)
    action = _action(_commands()[command], flag)
    # A flag may name its own variable where the usual one means something else.
    env = getattr(action, "env", "") or "TASKFLEET_" + flag[2:].replace("-", "_").upper()
    text, expected = _env_value(action)
    monkeypatch.setenv(env, text)
    parser = _commands()[command]  # built again: defaults are read when flags are added
    args = build_parser().parse_args(_argv(parser, command, flag))
    assert getattr(args, _action(parser, flag).dest) == expected, f"{env}={text}"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFLEET_QUEUE", "from-env")
    monkeypatch.setenv("TASKFLEET_KWARG", "a=1")
    args = build_parser().parse_args(["submit", "t", "--queue", "q", "--kwarg", "b=2"])
    assert (args.queue, args.kwarg) == ("q", ["b=2"])


def test_wait_timeout_is_not_the_task_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """TASKFLEET_TIMEOUT_S limits a submitted task's run; ``wait`` gives up after
    TASKFLEET_WAIT_TIMEOUT_S, as ``submit --wait`` does."""
    monkeypatch.setenv("TASKFLEET_TIMEOUT_S", "5")
    assert build_parser().parse_args(["wait", "id"]).timeout_s is None
    monkeypatch.setenv("TASKFLEET_WAIT_TIMEOUT_S", "9")
    assert build_parser().parse_args(["wait", "id"]).timeout_s == 9.0


def test_submit_options_from_the_environment(start_master: Callable[..., MasterProc]) -> None:
    master = start_master()
    env = {
        "TASKFLEET_MASTER": master.address,
        "TASKFLEET_QUEUE": "nobody-serves-this",
        "TASKFLEET_PRIORITY": "7",
        "TASKFLEET_META": "team=ops",
        "TASKFLEET_JSON": "1",
    }
    task_id = json.loads(ok(run("submit", "square", "3", env=env)))["id"]
    task = master.client().get(task_id)
    assert (task.spec.queue, task.spec.priority) == ("nobody-serves-this", 7)
    assert task.spec.metadata == {"team": "ops"}
