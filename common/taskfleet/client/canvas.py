"""Workflows of tasks: ``chain``, ``group`` and ``chord`` of signatures.

A signature is a call not yet made: the task name, its arguments and its
submit options (``add.s(1, 2)``, or ``signature("add", [1, 2], queue="math")``).
A workflow turns its signatures into specs that depend on each other
(``TaskSpec.depends_on`` with ``$N``) and sends them in ONE Submit, so the
master holds the whole graph: it survives the caller, a step runs as soon as
the steps before it succeeded, and a step that fails cancels the rest
(``ParentFailed``) without anyone polling.

- ``chain(a.s(x), b.s(), c.s())``: each step gets the previous step's result
  prepended to its arguments; ``submit`` returns the last step's handle.
- ``group(a.s(i) for i in ...)``: independent tasks; all their handles.
- ``chord(group, callback.s())``: the callback gets the list of the group's
  results as its first argument; the callback's handle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskfleet.common.calls import make_spec
from taskfleet.common.frozen import frozen
from taskfleet.common.model import TaskSpec

if TYPE_CHECKING:
    from taskfleet.client.aio import AsyncClient, AsyncTaskHandle
    from taskfleet.common.client import Client
    from taskfleet.common.handle import TaskHandle


@frozen
class Signature:
    """The task ``name`` called with ``args`` and ``kwargs``, submitted with
    ``options`` (the keywords of ``Client.submit``)."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def set(self, **options: Any) -> Signature:
        """The same call with these submit options added (``queue=``, ``priority=``...)."""
        return signature(self.name, self.args, self.kwargs, **{**self.options, **options})

    def spec(
        self, depends_on: Sequence[str] = (), *, pass_results: bool = False, gather: bool = False
    ) -> TaskSpec:
        """The spec to submit, waiting for ``depends_on`` (ids or ``$N``)."""
        return dataclasses.replace(
            make_spec(self.name, self.args, self.kwargs, **self.options),
            depends_on=tuple(depends_on),
            pass_results=pass_results,
            gather_results=gather,
        )


def signature(
    name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
) -> Signature:
    """A call of the task ``name``, not submitted; ``options`` as ``Client.submit``
    takes them (an unknown one raises TypeError here, not at submit)."""
    make_spec(name, args, kwargs, **options)  # checks the options and the arguments now
    return Signature(name, tuple(args), dict(kwargs or {}), dict(options))


class _Workflow:
    """Specs that refer to each other by position, submitted together."""

    def specs(self) -> list[TaskSpec]:
        raise NotImplementedError

    def _ids(self, client: Client | None) -> tuple[Client, list[str]]:
        from taskfleet.client.defaults import default_client

        through = client if client is not None else default_client()
        return through, through.submit_workflow(self.specs())


class _EndsInOne(_Workflow):
    """A workflow whose result is its last task's."""

    def submit(self, client: Client | None = None) -> TaskHandle[Any]:
        """Submit every task in one call; the last one's handle (its result is the
        workflow's). ``client`` defaults to the one ``configure`` set."""
        from taskfleet.common.handle import TaskHandle

        through, ids = self._ids(client)
        return TaskHandle(ids[-1], through)

    async def submit_async(self, client: AsyncClient) -> AsyncTaskHandle[Any]:
        from taskfleet.client.aio import AsyncTaskHandle

        ids = await client.submit_workflow(self.specs())
        return AsyncTaskHandle(ids[-1], client)


@dataclass(frozen=True)
class Chain(_EndsInOne):
    steps: tuple[Signature, ...]

    def specs(self) -> list[TaskSpec]:
        return [
            step.spec((f"${i - 1}",), pass_results=True) if i else step.spec()
            for i, step in enumerate(self.steps)
        ]


@dataclass(frozen=True)
class Group(_Workflow):
    members: tuple[Signature, ...]

    def specs(self) -> list[TaskSpec]:
        return [member.spec() for member in self.members]

    def submit(self, client: Client | None = None) -> list[TaskHandle[Any]]:
        """Submit every member in one call; their handles in order."""
        from taskfleet.common.handle import TaskHandle

        through, ids = self._ids(client)
        return [TaskHandle(task_id, through) for task_id in ids]

    async def submit_async(self, client: AsyncClient) -> list[AsyncTaskHandle[Any]]:
        from taskfleet.client.aio import AsyncTaskHandle

        ids = await client.submit_workflow(self.specs())
        return [AsyncTaskHandle(task_id, client) for task_id in ids]


@dataclass(frozen=True)
class Chord(_EndsInOne):
    header: Group
    callback: Signature

    def specs(self) -> list[TaskSpec]:
        header = self.header.specs()
        parents = [f"${i}" for i in range(len(header))]
        return [*header, self.callback.spec(parents, gather=True)]


def chain(*steps: Signature) -> Chain:
    """Steps run one after another, each passed the previous one's result."""
    if not steps:
        raise ValueError("chain: give at least one step")
    return Chain(tuple(steps))


def group(*members: Signature | Iterable[Signature]) -> Group:
    """Independent tasks submitted together: ``group(a.s(1), a.s(2))`` or
    ``group(a.s(i) for i in range(10))``."""
    flat: list[Signature] = []
    for member in members:
        flat += [member] if isinstance(member, Signature) else list(member)
    if not flat:
        raise ValueError("group: give at least one task")
    return Group(tuple(flat))


def chord(header: Group | Iterable[Signature], callback: Signature) -> Chord:
    """``header``'s tasks, then ``callback`` with the list of their results (in
    the group's order) as its first argument, once all succeeded."""
    return Chord(header if isinstance(header, Group) else group(header), callback)
