"""``map`` and ``imap_unordered``, as ``multiprocessing.Pool`` users know them.

One task per item, ``task(item)``. Items are submitted a window at a time
(``WINDOW``), the next window going in while the current one is waited for,
so a long iterable is neither held in memory nor waited for task by task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

from taskfleet.common.calls import make_spec, task_result
from taskfleet.common.errors import TaskCancelled, TaskFailed
from taskfleet.common.model import Task, TaskSpec

WINDOW = 1_000


class Named(Protocol):
    name: str


class Client(Protocol):
    """What ``imap`` needs of a ``Client``."""

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[str]: ...

    def wait(self, task_ids: Sequence[str], timeout_s: float | None = None) -> Iterator[Task]: ...


class AsyncClient(Protocol):
    """What ``aimap`` needs of an ``AsyncClient``."""

    async def submit_many(self, specs: Iterable[TaskSpec]) -> list[str]: ...

    def wait(
        self, task_ids: Sequence[str], timeout_s: float | None = None
    ) -> AsyncIterator[Task]: ...


def task_name(task: str | Named) -> str:
    """The name of a task given as a name or as an ``@task`` function."""
    return task if isinstance(task, str) else task.name


def imap(client: Client, task: str | Named, items: Iterable[Any]) -> Iterator[Any]:
    """The results of ``task(item)`` for each item, in the items' order."""
    for window in _windows(client, task, items):
        by_id = {t.id: t for t in client.wait([task_id for task_id, _ in window])}
        for task_id, index in window:
            yield _result(by_id[task_id], index)


def imap_unordered(client: Client, task: str | Named, items: Iterable[Any]) -> Iterator[Any]:
    """The results of ``task(item)`` as they finish."""
    for window in _windows(client, task, items):
        index_of = dict(window)
        for finished in client.wait(list(index_of)):
            yield _result(finished, index_of[finished.id])


def _windows(
    client: Client, task: str | Named, items: Iterable[Any]
) -> Iterator[list[tuple[str, int]]]:
    """(task id, item index) per item, a window at a time, one window ahead."""
    name = task_name(task)
    numbered = enumerate(items)
    ahead: list[tuple[str, int]] | None = None
    while True:
        chunk = list(islice(numbered, WINDOW))
        window = None
        if chunk:
            ids = client.submit_many(make_spec(name, [item]) for _, item in chunk)
            window = list(zip(ids, (index for index, _ in chunk), strict=True))
        if ahead is not None:
            yield ahead
        if window is None:
            return
        ahead = window


async def aimap(
    client: AsyncClient, task: str | Named, items: Iterable[Any], *, ordered: bool
) -> AsyncIterator[Any]:
    """``imap`` (``ordered``) or ``imap_unordered`` for an ``AsyncClient``."""
    name = task_name(task)
    numbered = enumerate(items)
    while chunk := list(islice(numbered, WINDOW)):
        ids = await client.submit_many(make_spec(name, [item]) for _, item in chunk)
        index_of = dict(zip(ids, (index for index, _ in chunk), strict=True))
        if ordered:
            by_id = {t.id: t async for t in client.wait(ids)}
            for task_id in ids:
                yield _result(by_id[task_id], index_of[task_id])
        else:
            async for finished in client.wait(ids):
                yield _result(finished, index_of[finished.id])


def _result(task: Task, index: int) -> Any:
    """The task's result, or its failure naming the item it was for."""
    try:
        return task_result(task)
    except TaskFailed as exc:
        failure = TaskCancelled if isinstance(exc, TaskCancelled) else TaskFailed
        raise failure(
            exc.task_id,
            exc.state,
            exc.type,
            f"(map item {index}) {exc.message}",
            exc.remote_traceback,
        ) from None
