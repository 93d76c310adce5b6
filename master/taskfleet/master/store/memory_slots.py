"""What the memory store keeps for each task, and the copies that go in and out
of it: a caller never holds an object the store goes on changing.

An unfinished task lives in a ``Slot``. A final one is frozen into bytes (its
fields as a tuple, marshalled), which the cyclic garbage collector never sees:
the finished tasks a master keeps until their result TTL (a million is
ordinary) cost a collection nothing, where as three dataclasses each they cost
a full one seconds. Not a tuple of atomic values, which the collector does
untrack, but only once a collection has walked it: new ones fill every young
collection, and the dict holding them stays tracked and walked in full.
"""

from __future__ import annotations

import dataclasses
import marshal
import operator
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


# A final task: see the module docstring; ``fields`` reads it.
Frozen = bytes

_TASK_FIELDS = [f.name for f in dataclasses.fields(Task)]
_SPEC_FIELDS = [f.name for f in dataclasses.fields(TaskSpec)]
_task_values = operator.attrgetter(*_TASK_FIELDS)
_spec_values = operator.attrgetter(*_SPEC_FIELDS)
_error_values = operator.attrgetter(*(f.name for f in dataclasses.fields(TaskError)))

# Where ``fields`` has what the store reads without thawing: the Task's fields
# in their order (its spec's as a list, its error's as one or None, its state
# as an int: marshal knows no enum member), then the slot's seq.
SPEC = _TASK_FIELDS.index("spec")
STATE = _TASK_FIELDS.index("state")
RESULT = _TASK_FIELDS.index("result")
ERROR = _TASK_FIELDS.index("error")
EXPIRES_AT = _TASK_FIELDS.index("expires_at")
SEQ = len(_TASK_FIELDS)
# ... and in the spec's list.
NAME = _SPEC_FIELDS.index("name")
QUEUE = _SPEC_FIELDS.index("queue")
IDEMPOTENCY_KEY = _SPEC_FIELDS.index("idempotency_key")

_STATES = {int(state): state for state in TaskState}


def freeze(slot: Slot) -> Frozen:
    """The final task of ``slot`` as the store keeps it from now on. The slot's
    scheduling facts are dropped: ``thaw_slot`` starts them afresh, as RetryTask
    would anyway."""
    task = slot.task
    values = list(_task_values(task))
    values[SPEC] = _spec_values(task.spec)
    values[STATE] = int(task.state)
    if task.error is not None:
        values[ERROR] = _error_values(task.error)
    values.append(slot.seq)
    return marshal.dumps(values)


def fields(frozen: Frozen) -> list[Any]:
    """A frozen task's fields, by the indexes above."""
    return marshal.loads(frozen)  # type: ignore[no-any-return]


def thaw(frozen: Frozen) -> Task:
    """A snapshot of a frozen task for the caller (its own spec and metadata)."""
    values = marshal.loads(frozen)
    del values[SEQ]
    values[SPEC] = TaskSpec(*values[SPEC])
    values[STATE] = _STATES[values[STATE]]
    if values[ERROR] is not None:
        values[ERROR] = TaskError(*values[ERROR])
    return Task(*values)


def thaw_slot(frozen: Frozen) -> Slot:
    """A frozen task brought back to life (RetryTask), in its old place in line."""
    return Slot(thaw(frozen), fields(frozen)[SEQ])


def state_of(facts: list[Any]) -> TaskState:
    """The state in a frozen task's ``fields``."""
    return _STATES[facts[STATE]]


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
