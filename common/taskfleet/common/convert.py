"""Conversion between the model's dataclasses and protobuf messages: the only
place where generated code meets the rest of taskfleet."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskfleet.common.model import (
    DEFAULT_QUEUE,
    JSON,
    LeaseRef,
    Outcome,
    QueueCounts,
    Stats,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    WorkerInfo,
)
from taskfleet.v1 import tasks_pb2, worker_pb2


def seconds_from_duration(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def unix_from_timestamp(t: Timestamp) -> float:
    return t.seconds + t.nanos / 1e9


def timestamp(unix_s: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(round(unix_s * 1e9))
    return t


def spec_from_proto(pb: tasks_pb2.TaskSpec) -> TaskSpec:
    """The spec as sent, with empty fields defaulted (validation is the master's)."""
    return TaskSpec(
        name=pb.name,
        queue=pb.queue or DEFAULT_QUEUE,
        payload=pb.payload or b'{"args":[],"kwargs":{}}',
        content_type=pb.content_type or JSON,
        priority=pb.priority,
        max_attempts=pb.max_attempts,
        timeout_s=seconds_from_duration(pb.timeout) if pb.HasField("timeout") else 0.0,
        not_before=unix_from_timestamp(pb.not_before) if pb.HasField("not_before") else 0.0,
        idempotency_key=pb.idempotency_key,
        metadata=dict(pb.metadata),
    )


def spec_to_proto(spec: TaskSpec) -> tasks_pb2.TaskSpec:
    pb = tasks_pb2.TaskSpec(
        name=spec.name,
        queue=spec.queue,
        payload=spec.payload,
        content_type=spec.content_type,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        idempotency_key=spec.idempotency_key,
        metadata=spec.metadata,
    )
    if spec.timeout_s:
        pb.timeout.CopyFrom(duration(spec.timeout_s))
    if spec.not_before:
        pb.not_before.CopyFrom(timestamp(spec.not_before))
    return pb


def error_to_proto(error: TaskError) -> tasks_pb2.TaskError:
    return tasks_pb2.TaskError(type=error.type, message=error.message, traceback=error.traceback)


def error_from_proto(pb: tasks_pb2.TaskError) -> TaskError:
    return TaskError(type=pb.type, message=pb.message, traceback=pb.traceback)


def task_to_proto(task: Task) -> tasks_pb2.Task:
    pb = tasks_pb2.Task(
        id=task.id,
        spec=spec_to_proto(task.spec),
        state=int(task.state),  # type: ignore[arg-type]
        attempts=task.attempts,
        result=task.result,
        result_content_type=task.result_content_type,
        worker_id=task.worker_id,
    )
    if task.error is not None:
        pb.error.CopyFrom(error_to_proto(task.error))
    if task.created_at:
        pb.created_at.CopyFrom(timestamp(task.created_at))
    if task.started_at:
        pb.started_at.CopyFrom(timestamp(task.started_at))
    if task.finished_at:
        pb.finished_at.CopyFrom(timestamp(task.finished_at))
    return pb


def task_from_proto(pb: tasks_pb2.Task, lease: int = 0) -> Task:
    return Task(
        id=pb.id,
        spec=spec_from_proto(pb.spec),
        state=TaskState(pb.state),
        attempts=pb.attempts,
        lease=lease,
        result=pb.result,
        result_content_type=pb.result_content_type,
        error=error_from_proto(pb.error) if pb.HasField("error") else None,
        worker_id=pb.worker_id,
        created_at=unix_from_timestamp(pb.created_at) if pb.HasField("created_at") else 0.0,
        started_at=unix_from_timestamp(pb.started_at) if pb.HasField("started_at") else 0.0,
        finished_at=unix_from_timestamp(pb.finished_at) if pb.HasField("finished_at") else 0.0,
    )


def ref_to_proto(ref: LeaseRef) -> worker_pb2.LeaseRef:
    return worker_pb2.LeaseRef(task_id=ref.task_id, lease=ref.lease)


def ref_from_proto(pb: worker_pb2.LeaseRef) -> LeaseRef:
    return LeaseRef(pb.task_id, pb.lease)


def outcome_to_proto(outcome: Outcome) -> worker_pb2.Outcome:
    pb = worker_pb2.Outcome(
        lease=ref_to_proto(outcome.ref),
        state=int(outcome.state),  # type: ignore[arg-type]
        result=outcome.result,
        result_content_type=outcome.result_content_type,
    )
    if outcome.error is not None:
        pb.error.CopyFrom(error_to_proto(outcome.error))
    if outcome.retry_delay_s is not None:
        pb.retry_after.CopyFrom(duration(outcome.retry_delay_s))
    return pb


def outcome_from_proto(pb: worker_pb2.Outcome) -> Outcome:
    return Outcome(
        ref=ref_from_proto(pb.lease),
        state=TaskState(pb.state),
        result=pb.result,
        result_content_type=pb.result_content_type or JSON,
        error=error_from_proto(pb.error) if pb.HasField("error") else None,
        retry_delay_s=seconds_from_duration(pb.retry_after) if pb.HasField("retry_after") else None,
    )


_STATE_FIELDS = {
    TaskState.PENDING: "pending",
    TaskState.RUNNING: "running",
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
}


def stats_to_proto(stats: Stats) -> tasks_pb2.Stats:
    queues = [
        tasks_pb2.QueueStats(
            queue=q.queue, **{f: q.counts.get(state, 0) for state, f in _STATE_FIELDS.items()}
        )
        for q in stats.queues
    ]
    workers = [
        tasks_pb2.WorkerInfo(
            worker_id=w.worker_id,
            hostname=w.hostname,
            pid=w.pid,
            queues=w.queues,
            task_names=w.task_names,
            concurrency=w.concurrency,
            running=w.running,
            peer=w.peer,
            connected_at=timestamp(w.connected_at),
        )
        for w in stats.workers
    ]
    return tasks_pb2.Stats(queues=queues, workers=workers)


def stats_from_proto(pb: tasks_pb2.Stats) -> Stats:
    queues = [
        QueueCounts(q.queue, {state: getattr(q, f) for state, f in _STATE_FIELDS.items()})
        for q in pb.queues
    ]
    workers = [
        WorkerInfo(
            worker_id=w.worker_id,
            hostname=w.hostname,
            pid=w.pid,
            queues=tuple(w.queues),
            task_names=tuple(w.task_names),
            concurrency=w.concurrency,
            running=w.running,
            peer=w.peer,
            connected_at=unix_from_timestamp(w.connected_at),
        )
        for w in pb.workers
    ]
    return Stats(queues, workers)
