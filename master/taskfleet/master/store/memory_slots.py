"""What the memory store keeps for each task, and the copies that go in and out
of it: a caller never holds an object the store goes on changing."""

from __future__ import annotations

import dataclasses

from taskfleet.common.model import Task, TaskSpec

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
