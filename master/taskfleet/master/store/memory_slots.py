"""What the memory store keeps for each task, and the copies that go in and out
of it: a caller never holds an object the store goes on changing.

An unfinished task lives in a ``Slot``. A final one is frozen into a flat tuple
of atomic values (str, int, float, bytes, bool, None): the cyclic garbage
collector untracks such a tuple the first time it sees it, so the finished
tasks a master keeps until their result TTL (a million is ordinary) cost a full
collection nothing, where as three dataclasses each they cost it seconds. Enum
members, dicts and nested tuples would keep the tuple tracked, so the state is
its int, the error three fields and the parents and metadata are spread flat
at its end.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from taskfleet.common.model import Task, TaskError, TaskSpec, TaskState

# (-priority, seq, task_id): the heap top is the next task to hand out.
ReadyEntry = tuple[int, int, str]


@dataclasses.dataclass(slots=True, eq=False)
class Slot:
    """A task plus the scheduling facts the public model does not carry."""

    task: Task
    seq: int
    delayed: bool = False  # PENDING but waiting in the delayed heap
    deadline: float = 0.0  # RUNNING: when the lease lapses
    # Workers of lapsed leases. A tuple: an empty one is shared and, unlike a
    # list, not one more object per task for the garbage collector to walk.
    lost_by: tuple[str, ...] = ()
    attempt_base: int = 0  # attempts when RetryTask last gave a fresh budget
    waiting: int = 0  # parents not yet SUCCEEDED; the task is in no heap meanwhile
    ready_since: float = 0.0  # PENDING and ready: since when (store.oldest_pending)


# A final task: see the module docstring and ``freeze`` for its layout.
Frozen = tuple[Any, ...]

# Where ``freeze`` puts the fields the store reads without thawing.
SEQ = 1
STATE = 2
RESULT = 5
EXPIRES_AT = 15
NAME = 18
QUEUE = 19
IDEMPOTENCY_KEY = 26
# The fixed fields; then the parents (as many as the last fixed field says) and
# the metadata's keys and values, alternating.
_FIXED = 34

_STATES = {int(state): state for state in TaskState}


def freeze(slot: Slot) -> Frozen:
    """The final task of ``slot`` as the store keeps it from now on. The slot's
    scheduling facts are dropped: ``thaw_slot`` starts them afresh, as RetryTask
    would anyway."""
    task = slot.task
    spec = task.spec
    error = task.error
    frozen: Frozen = (
        task.id,
        slot.seq,
        int(task.state),
        task.attempts,
        task.lease,
        task.result,
        task.result_content_type,
        None if error is None else error.type,
        "" if error is None else error.message,
        "" if error is None else error.traceback,
        task.worker_id,
        task.created_at,
        task.started_at,
        task.finished_at,
        task.lost_leases,
        task.expires_at,
        task.progress,
        task.progress_message,
        spec.name,
        spec.queue,
        spec.payload,
        spec.content_type,
        spec.priority,
        spec.max_attempts,
        spec.timeout_s,
        spec.not_before,
        spec.idempotency_key,
        spec.result_ttl_s,
        spec.expires_at,
        spec.pass_results,
        spec.gather_results,
        spec.concurrency_key,
        spec.concurrency_limit,
        len(spec.depends_on),
    )
    if spec.depends_on or spec.metadata:
        frozen += spec.depends_on + tuple(itertools.chain.from_iterable(spec.metadata.items()))
    return frozen


def thaw(frozen: Frozen) -> Task:
    """A snapshot of a frozen task for the caller (its own spec and metadata)."""
    (
        task_id,
        _,
        state,
        attempts,
        lease,
        result,
        result_content_type,
        error_type,
        error_message,
        error_traceback,
        worker_id,
        created_at,
        started_at,
        finished_at,
        lost_leases,
        expires_at,
        progress,
        progress_message,
        name,
        queue,
        payload,
        content_type,
        priority,
        max_attempts,
        timeout_s,
        not_before,
        idempotency_key,
        result_ttl_s,
        spec_expires_at,
        pass_results,
        gather_results,
        concurrency_key,
        concurrency_limit,
        parents,
    ) = frozen[:_FIXED]
    pairs = frozen[_FIXED + parents :]
    spec = TaskSpec(
        name,
        queue,
        payload,
        content_type,
        priority,
        max_attempts,
        timeout_s,
        not_before,
        idempotency_key,
        dict(zip(pairs[::2], pairs[1::2], strict=True)),
        result_ttl_s,
        spec_expires_at,
        frozen[_FIXED : _FIXED + parents],
        pass_results,
        gather_results,
        concurrency_key,
        concurrency_limit,
    )
    return Task(
        task_id,
        spec,
        _STATES[state],
        attempts,
        lease,
        result,
        result_content_type,
        None if error_type is None else TaskError(error_type, error_message, error_traceback),
        worker_id,
        created_at,
        started_at,
        finished_at,
        lost_leases,
        expires_at,
        progress,
        progress_message,
    )


def thaw_slot(frozen: Frozen) -> Slot:
    """A frozen task brought back to life (RetryTask), in its old place in line."""
    return Slot(thaw(frozen), frozen[SEQ])


def frozen_state(frozen: Frozen) -> TaskState:
    return _STATES[frozen[STATE]]


def own_spec(spec: TaskSpec, depends_on: tuple[str, ...]) -> TaskSpec:
    """The spec with our own metadata dict, so the caller's later edits don't leak in,
    and its parents as ids."""
    # Positional and explicit: dataclasses.replace costs several times more per task.
    return TaskSpec(
        spec.name,
        spec.queue,
        spec.payload,
        spec.content_type,
        spec.priority,
        spec.max_attempts,
        spec.timeout_s,
        spec.not_before,
        spec.idempotency_key,
        dict(spec.metadata),
        spec.result_ttl_s,
        spec.expires_at,
        depends_on,
        spec.pass_results,
        spec.gather_results,
        spec.concurrency_key,
        spec.concurrency_limit,
    )


def snapshot(task: Task) -> Task:
    """A snapshot for the caller: the store's own Task keeps changing under the lock."""
    # The spec is frozen and never replaced, so the snapshot can share it.
    return Task(
        task.id,
        task.spec,
        task.state,
        task.attempts,
        task.lease,
        task.result,
        task.result_content_type,
        task.error,
        task.worker_id,
        task.created_at,
        task.started_at,
        task.finished_at,
        task.lost_leases,
        task.expires_at,
        task.progress,
        task.progress_message,
    )
