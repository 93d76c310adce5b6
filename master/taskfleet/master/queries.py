"""Checks and page tokens of the operator calls (ListTasks, PurgeTasks): a bad
filter or token is refused with a message naming the field."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import TaskState
from taskfleet.master.store.base import MAX_PAGE_SIZE, TaskQuery
from taskfleet.master.validation import MAX_NAME_CHARS

DEFAULT_PAGE_SIZE = 100
_TOKEN_PREFIX = "seq:"  # versions the token, so its form can change later


def task_query(queue: str, name: str, states: Iterable[int]) -> TaskQuery:
    for field, value in (("queue", queue), ("name", name)):
        if len(value) > MAX_NAME_CHARS:
            raise InvalidArgument(f"{field}: longer than {MAX_NAME_CHARS} characters")
    chosen = set()
    for i, state in enumerate(states):
        try:
            chosen.add(TaskState(state))
        except ValueError:
            raise InvalidArgument(f"states[{i}]: {state} is not a task state") from None
    return TaskQuery(queue, name, frozenset(chosen))


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, capped at ``MAX_PAGE_SIZE``."""
    if requested < 0:
        raise InvalidArgument("page_size: must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def token_from_cursor(cursor: int | None) -> str:
    if cursor is None:
        return ""
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{cursor}".encode()).decode()


def cursor_from_token(token: str) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
        if text.startswith(_TOKEN_PREFIX):
            cursor = int(text.removeprefix(_TOKEN_PREFIX))
            if cursor >= 0:
                return cursor
    except (UnicodeError, binascii.Error, ValueError):
        pass
    raise InvalidArgument("page_token: not a token from a ListTasks page; pass it unchanged")
