"""Flag parsing: argparse whose every flag reads ``TASKFLEET_<FLAG>``, and the
types that check a flag's value.

A flag given on the command line wins over the environment, which wins over
the default. A bad value is one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any

from taskfleet.common.batching import MAX_ITEM_BYTES
from taskfleet.common.model import MAX_DURATION_S, MAX_UNIX_S


def env_name(flag: str) -> str:
    """The environment variable a flag reads: ``--some-flag`` -> ``TASKFLEET_SOME_FLAG``."""
    return "TASKFLEET_" + flag.lstrip("-").replace("-", "_").upper()


class _AppendOverEnv(argparse.Action):
    """``action="append"`` whose items on the command line replace the one item
    from the environment instead of adding to it: the flag wins."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        items = getattr(namespace, self.dest)
        if not isinstance(items, list) or items is self.default:
            items = []
        setattr(namespace, self.dest, [*items, values])


class EnvDefaultsParser(argparse.ArgumentParser):
    """argparse that reads each flag's default from ``TASKFLEET_<FLAG>`` and
    reports bad input as one line instead of usage plus traceback.

    A value from the environment goes through the flag's type like one typed on
    the command line, and is checked only when its command runs.
    """

    def add_flag(
        self, flag: str, *, default: Any = None, env: str = "", **kwargs: Any
    ) -> argparse.Action:
        """Add ``flag``, reading ``env`` (by default ``TASKFLEET_<FLAG>``) for its default.

        ``env`` is for a flag whose usual variable means something else for
        another command."""
        env = env or env_name(flag)
        value = os.environ.get(env)
        if kwargs.get("action") == "store_true":
            default = default if value is None else value.lower() in ("1", "true", "yes", "on")
        elif kwargs.get("action") == "append":
            kwargs["action"] = _AppendOverEnv
            # A string default is converted by the flag's type at the end of parsing;
            # parse_known_args then makes it the list's one item.
            default = value if value is not None else (default if default is not None else [])
        elif value is not None:
            default = value
        help_text = kwargs.pop("help", "")
        action = self.add_argument(flag, default=default, help=f"{help_text} [env {env}]", **kwargs)
        action.env = env  # type: ignore[attr-defined]  # for the test that every flag has one
        return action

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            if isinstance(action, _AppendOverEnv):
                items = getattr(parsed, action.dest, [])
                if not isinstance(items, list):  # the one item from the environment
                    setattr(parsed, action.dest, [items])
        return parsed, rest

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_float(text: str) -> float:
    """Seconds above 0 that a protobuf Duration can hold (no inf, no nan)."""
    return _seconds(text, high=MAX_DURATION_S, allow_zero=False)


def non_negative_float(text: str) -> float:
    """Seconds from 0 that a protobuf Duration can hold (no inf, no nan)."""
    return _seconds(text, high=MAX_DURATION_S, allow_zero=True)


def delay_float(text: str) -> float:
    """Seconds above 0 from now until at most 9999-12-31, the end of a protobuf Timestamp."""
    return _seconds(text, high=MAX_UNIX_S - time.time(), allow_zero=False)


def _seconds(text: str, *, high: float, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # nan compares false with everything, so it fails both checks.
    if not ((value >= 0 if allow_zero else value > 0) and value <= high):
        low = "from 0" if allow_zero else "more than 0"
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds {low} and at most {high:.0f}, got {text!r}"
        )
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """A flag type for integers from ``low`` to ``high`` (a protobuf field's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low} to {high}, got {text!r}"
            )
        return value

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def utf8_text(text: str) -> str:
    """Text that can travel in a protobuf string: the command line and the
    environment can carry bytes that are not UTF-8 (Python keeps them as
    surrogates), and protobuf refuses those with an exception."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"must be UTF-8 text, got {text!r}") from None
    return text


def item_bytes(text: str) -> int:
    """A size limit on one payload or result: one must fit in a gRPC message."""
    value = int(text)
    if not 0 <= value <= MAX_ITEM_BYTES:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_ITEM_BYTES}, got {text}")
    return value


_PER_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


def rate_limit(text: str) -> tuple[str, float]:
    """``NAME=N/s`` (or ``/m``, ``/h``; a bare N is per second): a task name and
    the tasks per second it may be leased at, above 0."""
    name, sep, rate = text.rpartition("=")
    count, _, unit = rate.strip().partition("/")
    per = _PER_S.get(unit.strip() or "s")
    try:
        number = float(count)
    except ValueError:
        number = math.nan
    if not sep or not name.strip() or per is None or not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(
            f"want NAME=N/s, NAME=N/m or NAME=N/h with N above 0, got {text!r}"
        )
    return utf8_text(name.strip()), number / per


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
