"""The memory store's dependency bookkeeping: the parents a batch names are
checked before any of it is stored, a child waits in no heap until its last
parent succeeds, and a parent that fails cancels its dependents."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from taskfleet.common.model import Task, TaskError, TaskSpec, TaskState
from taskfleet.master.store.deps import (
    check_parent,
    check_size,
    parent_failed_error,
    results_mode,
    too_large,
    with_results,
)
from taskfleet.master.store.memory_slots import RESULT, Frozen, Slot, fields, snapshot


class MemoryDeps:
    """The dependency methods of ``MemoryStore``."""

    _slots: dict[str, Slot]
    _final: dict[str, Frozen]
    # Waiting children of each unfinished parent, and the tasks that a call
    # readied or cancelled through them (reported with the call's own).
    _children: dict[str, list[str]]
    _settled: list[Slot]

    def _enqueue(self, slot: Slot, ready_at: float, now: float) -> None:
        raise NotImplementedError  # MemoryStore's

    def _end(self, slot: Slot, state: TaskState, now: float) -> None:
        raise NotImplementedError  # MemoryStore's

    def _state(self, task_id: str) -> TaskState | None:
        raise NotImplementedError  # MemoryStore's

    def _check_parents(
        self,
        specs: Sequence[TaskSpec],
        parents_of: Sequence[Sequence[str]],
        ids: Sequence[str],
        new: Sequence[bool],
    ) -> None:
        """Refuse the batch before any of it is stored if a parent is unknown or
        failed, or finished parents' results make a task too large."""
        batch = {task_id for task_id, is_new in zip(ids, new, strict=True) if is_new}
        for i, parents in enumerate(parents_of):
            for j, parent in enumerate(parents if new[i] else ()):
                if parent not in batch:
                    check_parent(f"tasks[{i}].depends_on[{j}]", parent, self._state(parent))
            done = all(p not in batch and self._state(p) is TaskState.SUCCEEDED for p in parents)
            if new[i] and parents and done and results_mode(specs[i]):
                check_size(f"tasks[{i}]", self._with_results(specs[i], parents))

    def _with_results(self, spec: TaskSpec, parents: Sequence[str]) -> bytes:
        # Every parent succeeded, so every parent is frozen, unless purged or
        # expired since: its result is then gone, and null is passed, as the SQL
        # stores pass it.
        results = [fields(self._final[p])[RESULT] if p in self._final else b"" for p in parents]
        return with_results(spec.payload, results, results_mode(spec))

    def _wait_or_enqueue(self, slot: Slot, now: float) -> None:
        """Queue a new task, or make it wait for its unfinished parents."""
        spec = slot.task.spec
        if not spec.depends_on:  # most tasks: straight into line
            self._enqueue(slot, spec.not_before, now)
            return
        parents = dict.fromkeys(spec.depends_on)
        open_parents = [p for p in parents if self._state(p) is not TaskState.SUCCEEDED]
        slot.waiting = len(open_parents)
        for parent in open_parents:
            self._children.setdefault(parent, []).append(slot.task.id)
        if slot.waiting:
            slot.delayed = True  # in no heap until its last parent succeeds
        else:
            self._ready_child(slot, now)

    def _ready_child(self, slot: Slot, now: float) -> TaskError | None:
        """Queue a task whose parents all succeeded, with their results if it takes
        them; the error instead when they make it too large (it is not queued)."""
        spec = slot.task.spec
        if results_mode(spec) and spec.depends_on:
            payload = self._with_results(spec, spec.depends_on)
            error = too_large(payload)
            if error is not None:
                return error
            slot.task.spec = dataclasses.replace(spec, payload=payload)
        self._enqueue(slot, spec.not_before, now)
        return None

    def _settle(self, ended: Slot, now: float) -> None:
        """Ready the children whose last parent just succeeded, or cancel the
        dependents of a parent that failed (transitively, without recursion)."""
        work = [ended]
        while work:
            parent = work.pop().task
            for child_id in self._children.pop(parent.id, ()):
                child = self._slots.get(child_id)
                if child is None or child.task.state is not TaskState.PENDING:
                    continue
                if parent.state is TaskState.SUCCEEDED:
                    child.waiting -= 1
                    if child.waiting:
                        continue
                    self._settled.append(child)
                    error = self._ready_child(child, now)
                    if error is None:
                        continue
                    end = TaskState.FAILED
                else:
                    self._settled.append(child)
                    error = parent_failed_error(parent.id, parent.state)
                    end = TaskState.CANCELLED
                child.task.error = error
                self._end(child, end, now)
                work.append(child)

    def _take_settled(self) -> list[Task]:
        """The tasks this call readied or cancelled as dependents, as they are now."""
        settled = [snapshot(slot.task) for slot in dict.fromkeys(self._settled)]
        self._settled.clear()
        return settled
