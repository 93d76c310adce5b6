"""Conversion between the model's dataclasses and protobuf messages: the only
place where generated code meets the rest of taskfleet."""

from __future__ import annotations

import time
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskfleet.common.batching import cut, spec_bytes
from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import (
    DEFAULT_QUEUE,
    JSON,
    MAX_DURATION_S,
    MAX_UNIX_S,
    Lease,
    LeaseRef,
    MasterInfo,
    MissedTicks,
    Outcome,
    PendingName,
    Progress,
    QueueCounts,
    Schedule,
    Stats,
    Task,
    TaskError,
    TaskProgress,
    TaskSpec,
    TaskState,
    WorkerInfo,
)
from taskfleet.v1 import tasks_pb2, worker_pb2

_NANOS_PER_S = 1_000_000_000


def seconds_from_duration(d: Duration, field: str = "duration") -> float:
    """The seconds ``d`` holds. A Duration whose nanos are out of range or of the
    other sign than its seconds is refused with InvalidArgument naming ``field``:
    normalising it would guess what the sender meant."""
    seconds, nanos = d.seconds, d.nanos
    if not -_NANOS_PER_S < nanos < _NANOS_PER_S or (
        nanos and seconds and (nanos < 0) != (seconds < 0)
    ):
        raise InvalidArgument(
            f"{field}: nanos must be within ±999999999 and have the sign of seconds, "
            f"got seconds={seconds} nanos={nanos}"
        )
    return seconds + nanos / 1e9


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def unix_from_timestamp(t: Timestamp, field: str = "timestamp") -> float:
    """The unix time ``t`` holds; InvalidArgument naming ``field`` when its nanos
    are outside 0..999999999, as for Durations."""
    if not 0 <= t.nanos < _NANOS_PER_S:
        raise InvalidArgument(f"{field}: nanos must be within 0..999999999, got {t.nanos}")
    return t.seconds + t.nanos / 1e9


def timestamp(unix_s: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(round(unix_s * 1e9))
    return t


def _set_clock_time(t: Timestamp, unix_s: float) -> None:
    """Set ``t`` in place to ``unix_s``, a time this system's clock gave (or one
    checked to be below MAX_UNIX_S): the two fields directly, at half the cost of
    protobuf's Python-level ``FromNanoseconds``, which also checks the year is
    within 1..9999 (times a user gives keep that check). Several times per task
    a master sends."""
    nanos = round(unix_s * 1e9)
    t.seconds = nanos // _NANOS_PER_S
    t.nanos = nanos % _NANOS_PER_S


def spec_from_proto(pb: tasks_pb2.TaskSpec) -> TaskSpec:
    """The spec as sent, with empty fields defaulted (validation is the master's)."""
    # Positional (name, queue, payload, content_type, priority, max_attempts,
    # timeout_s, not_before, idempotency_key, metadata, result_ttl_s, expires_at):
    # keywords cost more per task.
    return TaskSpec(
        pb.name,
        pb.queue or DEFAULT_QUEUE,
        pb.payload or b'{"args":[],"kwargs":{}}',
        pb.content_type or JSON,
        pb.priority,
        pb.max_attempts,
        seconds_from_duration(pb.timeout, "timeout") if pb.HasField("timeout") else 0.0,
        unix_from_timestamp(pb.not_before, "not_before") if pb.HasField("not_before") else 0.0,
        pb.idempotency_key,
        dict(pb.metadata) if pb.metadata else {},
        seconds_from_duration(pb.result_ttl, "result_ttl") if pb.HasField("result_ttl") else 0.0,
        unix_from_timestamp(pb.expires_at, "expires_at") if pb.HasField("expires_at") else 0.0,
        tuple(pb.depends_on) if pb.depends_on else (),
        pb.pass_results,
        pb.gather_results,
        pb.concurrency_key,
        pb.concurrency_limit,
    )


def specs_from_proto(pbs: Sequence[tasks_pb2.TaskSpec]) -> list[TaskSpec]:
    """The specs of a Submit; InvalidArgument names the field as ``tasks[i].timeout``."""
    specs = []
    for i, pb in enumerate(pbs):
        try:
            specs.append(spec_from_proto(pb))
        except InvalidArgument as exc:
            raise InvalidArgument(f"tasks[{i}].{exc}") from None
    return specs


def spec_to_proto(spec: TaskSpec) -> tasks_pb2.TaskSpec:
    pb = tasks_pb2.TaskSpec()
    _fill_spec(pb, spec)
    return pb


def _fill_spec(pb: tasks_pb2.TaskSpec, spec: TaskSpec) -> None:
    # Fields are set in place on a (sub)message, and defaults are skipped:
    # building messages and copying them in costs two to three times as much,
    # and the master does this for every task it hands out or reports.
    pb.name = spec.name
    pb.queue = spec.queue
    pb.payload = spec.payload
    pb.content_type = spec.content_type
    if spec.priority:
        pb.priority = spec.priority
    if spec.max_attempts:
        pb.max_attempts = spec.max_attempts
    if spec.idempotency_key:
        pb.idempotency_key = spec.idempotency_key
    if spec.metadata:
        pb.metadata.update(spec.metadata)
    if spec.timeout_s:
        pb.timeout.FromNanoseconds(round(spec.timeout_s * 1e9))
    if spec.not_before:
        pb.not_before.FromNanoseconds(round(spec.not_before * 1e9))
    if spec.expires_at:
        pb.expires_at.FromNanoseconds(round(spec.expires_at * 1e9))
    if spec.result_ttl_s:
        pb.result_ttl.FromNanoseconds(round(spec.result_ttl_s * 1e9))
    if spec.depends_on:
        pb.depends_on.extend(spec.depends_on)
    if spec.pass_results:
        pb.pass_results = True
    if spec.gather_results:
        pb.gather_results = True
    if spec.concurrency_key:
        pb.concurrency_key = spec.concurrency_key
    if spec.concurrency_limit:
        pb.concurrency_limit = spec.concurrency_limit


def _fill_error(pb: tasks_pb2.TaskError, error: TaskError) -> None:
    pb.SetInParent()  # present even if every field is empty
    pb.type = error.type
    pb.message = error.message
    pb.traceback = error.traceback


def error_from_proto(pb: tasks_pb2.TaskError) -> TaskError:
    return TaskError(type=pb.type, message=pb.message, traceback=pb.traceback)


def task_to_proto(task: Task) -> tasks_pb2.Task:
    pb = tasks_pb2.Task()
    fill_task(pb, task)
    return pb


def fill_task(pb: tasks_pb2.Task, task: Task) -> None:
    """Write ``task`` into an empty ``pb``: in place, for the repeated fields of a batch."""
    pb.id = task.id
    _fill_spec(pb.spec, task.spec)
    pb.state = task.state.value  # type: ignore[assignment]
    if task.attempts:
        pb.attempts = task.attempts
    if task.result:
        pb.result = task.result
    if task.result_content_type:
        pb.result_content_type = task.result_content_type
    if task.worker_id:
        pb.worker_id = task.worker_id
    if task.error is not None:
        _fill_error(pb.error, task.error)
    if task.created_at:
        _set_clock_time(pb.created_at, task.created_at)
    if task.started_at:
        _set_clock_time(pb.started_at, task.started_at)
    if task.finished_at:
        _set_clock_time(pb.finished_at, task.finished_at)
    if task.lost_leases:
        pb.lost_leases = task.lost_leases
    if task.expires_at:
        if task.expires_at < MAX_UNIX_S:
            _set_clock_time(pb.expires_at, task.expires_at)
        else:  # the finish time plus a TTL of up to 10,000 years may pass the year 9999
            pb.expires_at.seconds = MAX_UNIX_S
    if task.progress:
        pb.progress = task.progress
    if task.progress_message:
        pb.progress_message = task.progress_message


def assignments_to_proto(
    leases: Sequence[Lease], results_ack: int = 0
) -> list[worker_pb2.MasterMessage]:
    """The messages handing ``leases`` to a worker, cut by count and bytes; the
    first acknowledges its Results batches up to ``results_ack`` (0: none)."""
    messages: list[worker_pb2.MasterMessage] = []
    # The count is the caller's to limit (it leases no more than it may send).
    for batch in cut(leases, _lease_bytes, max_count=len(leases)):
        message = worker_pb2.MasterMessage()
        if results_ack and not messages:
            message.assignments.results_ack = results_ack
        add = message.assignments.assignments.add
        for lease in batch:
            task = lease.task
            assignment = add()
            assignment.lease.task_id = task.id
            assignment.lease.lease = task.lease
            # What a worker reads of the task, not all of it: its times and the
            # worker's own id cost the master 2.5 us a task to set.
            sent = assignment.task
            sent.id = task.id
            _fill_spec(sent.spec, task.spec)
            sent.state = tasks_pb2.TASK_STATE_RUNNING
            sent.attempts = task.attempts
        messages.append(message)
    return messages


def _lease_bytes(lease: Lease) -> int:
    return spec_bytes(lease.task.spec)


def task_from_proto(pb: tasks_pb2.Task, lease: int = 0) -> Task:
    # Positional, in Task's field order: keywords cost more for every task a client waits on.
    return Task(
        pb.id,
        spec_from_proto(pb.spec),
        _STATES.get(pb.state) or TaskState(pb.state),  # the call raises for unknown values
        pb.attempts,
        lease,
        pb.result,
        pb.result_content_type,
        error_from_proto(pb.error) if pb.HasField("error") else None,
        pb.worker_id,
        unix_from_timestamp(pb.created_at) if pb.HasField("created_at") else 0.0,
        unix_from_timestamp(pb.started_at) if pb.HasField("started_at") else 0.0,
        unix_from_timestamp(pb.finished_at) if pb.HasField("finished_at") else 0.0,
        pb.lost_leases,
        unix_from_timestamp(pb.expires_at) if pb.HasField("expires_at") else 0.0,
        pb.progress,
        pb.progress_message,
    )


def fill_progress(pb: tasks_pb2.Task, update: Progress) -> None:
    """A wait's progress update: a RUNNING task with only its progress set
    (WaitTasksRequest.progress says why no more)."""
    pb.id = update.ref.task_id
    pb.state = tasks_pb2.TASK_STATE_RUNNING
    pb.progress = update.fraction
    pb.progress_message = update.message


def task_progress_from_proto(pb: tasks_pb2.Task) -> TaskProgress:
    return TaskProgress(pb.id, pb.progress, pb.progress_message)


def progress_to_proto(update: Progress) -> worker_pb2.Progress:
    return worker_pb2.Progress(
        lease=ref_to_proto(update.ref), fraction=update.fraction, message=update.message
    )


def progress_from_proto(pb: worker_pb2.Progress) -> Progress:
    """A worker's progress update; InvalidArgument for a fraction outside 0..1."""
    if not 0.0 <= pb.fraction <= 1.0:
        raise InvalidArgument(
            f"progress.fraction of task {pb.lease.task_id} must be 0 to 1, not {pb.fraction}"
        )
    return Progress(ref_from_proto(pb.lease), pb.fraction, pb.message)


def ref_to_proto(ref: LeaseRef) -> worker_pb2.LeaseRef:
    return worker_pb2.LeaseRef(task_id=ref.task_id, lease=ref.lease)


def ref_from_proto(pb: worker_pb2.LeaseRef) -> LeaseRef:
    return LeaseRef(pb.task_id, pb.lease)


def fill_outcome(pb: worker_pb2.Outcome, outcome: Outcome) -> None:
    """Write ``outcome`` into an empty ``pb``: in place, for the repeated field of a batch."""
    ref = outcome.ref
    pb.lease.task_id = ref.task_id
    pb.lease.lease = ref.lease
    pb.state = outcome.state.value  # type: ignore[assignment]
    if outcome.result:
        pb.result = outcome.result
    if outcome.result_content_type != JSON:  # empty says JSON: a quarter of a batch's bytes
        pb.result_content_type = outcome.result_content_type
    if outcome.error is not None:
        _fill_error(pb.error, outcome.error)
    if outcome.max_attempts != 1:
        pb.max_attempts = outcome.max_attempts
    if outcome.no_retry:
        pb.no_retry = True
    if outcome.retry_delay_s:
        # A backoff doubled past any Duration (or NaN) asks for the longest one: a
        # Duration the master refuses would lose the outcome, one that cannot be
        # built would stop the worker's sending.
        delay_s = outcome.retry_delay_s
        delay_s = delay_s if delay_s <= MAX_DURATION_S else MAX_DURATION_S
        pb.retry_delay.FromNanoseconds(round(delay_s * 1e9))


def outcome_from_proto(pb: worker_pb2.Outcome) -> Outcome:
    lease = pb.lease
    return Outcome(
        LeaseRef(lease.task_id, lease.lease),
        _STATES.get(pb.state) or TaskState(pb.state),  # the call raises for unknown values
        pb.result,
        pb.result_content_type or JSON,
        error_from_proto(pb.error) if pb.HasField("error") else None,
        pb.max_attempts or 1,
        pb.no_retry,
        seconds_from_duration(pb.retry_delay, "outcome.retry_delay")
        if pb.HasField("retry_delay")
        else 0.0,
    )


_STATES = {int(state): state for state in TaskState}


_STATE_FIELDS = {
    TaskState.PENDING: "pending",
    TaskState.RUNNING: "running",
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
}


def stats_to_proto(stats: Stats, now: float | None = None) -> tasks_pb2.Stats:
    """Stats as the master answers at ``now`` (default: the clock's): each queue's
    oldest pending task travels as an age, which a client's clock need not agree with."""
    now = time.time() if now is None else now
    queues = [
        tasks_pb2.QueueStats(
            queue=q.queue,
            oldest_pending_age=duration(max(0.0, now - q.oldest_pending_at))
            if q.oldest_pending_at
            else None,
            **{f: q.counts.get(state, 0) for state, f in _STATE_FIELDS.items()},
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
            master_id=w.master_id,
        )
        for w in stats.workers
    ]
    masters = [
        tasks_pb2.MasterInfo(
            master_id=m.master_id,
            hostname=m.hostname,
            pid=m.pid,
            listen=m.listen,
            started_at=timestamp(m.started_at),
            seen_at=timestamp(m.seen_at),
        )
        for m in stats.masters
    ]
    pending = [
        tasks_pb2.PendingName(queue=p.queue, name=p.name, count=p.count)
        for p in stats.pending_names
    ]
    return tasks_pb2.Stats(queues=queues, workers=workers, masters=masters, pending_names=pending)


def stats_from_proto(pb: tasks_pb2.Stats, now: float | None = None) -> Stats:
    """Stats as received at ``now`` (default: the clock's), ages turned into times
    of this clock."""
    now = time.time() if now is None else now
    queues = [
        QueueCounts(
            q.queue,
            {state: getattr(q, f) for state, f in _STATE_FIELDS.items()},
            now - seconds_from_duration(q.oldest_pending_age, "oldest_pending_age")
            if q.HasField("oldest_pending_age")
            else 0.0,
        )
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
            master_id=w.master_id,
        )
        for w in pb.workers
    ]
    masters = [
        MasterInfo(
            master_id=m.master_id,
            hostname=m.hostname,
            pid=m.pid,
            listen=m.listen,
            started_at=unix_from_timestamp(m.started_at),
            seen_at=unix_from_timestamp(m.seen_at),
        )
        for m in pb.masters
    ]
    pending = [PendingName(p.queue, p.name, p.count) for p in pb.pending_names]
    return Stats(queues, workers, masters, pending)


def schedule_from_proto(pb: tasks_pb2.Schedule) -> Schedule:
    """The schedule a producer sent, fields named as ``schedule.interval``; what the
    master sets (id, times) is read too, so a client reads its answers with it."""
    try:
        spec = spec_from_proto(pb.spec)
    except InvalidArgument as exc:
        raise InvalidArgument(f"schedule.spec.{exc}") from None
    if pb.missed_ticks not in (0, *MissedTicks):
        raise InvalidArgument(f"schedule.missed_ticks: unknown value {pb.missed_ticks}")
    return Schedule(
        pb.id,
        spec,
        pb.cron,
        seconds_from_duration(pb.interval, "schedule.interval") if pb.HasField("interval") else 0.0,
        pb.timezone or "UTC",
        pb.paused,
        MissedTicks(pb.missed_ticks or MissedTicks.FIRE_ONCE),
        unix_from_timestamp(pb.next_fire) if pb.HasField("next_fire") else 0.0,
        unix_from_timestamp(pb.last_fire) if pb.HasField("last_fire") else 0.0,
        unix_from_timestamp(pb.created_at) if pb.HasField("created_at") else 0.0,
    )


def schedule_to_proto(schedule: Schedule) -> tasks_pb2.Schedule:
    pb = tasks_pb2.Schedule(
        id=schedule.id,
        cron=schedule.cron,
        timezone=schedule.timezone,
        paused=schedule.paused,
        missed_ticks=tasks_pb2.MissedTicks.ValueType(schedule.missed),
    )
    _fill_spec(pb.spec, schedule.spec)
    if schedule.interval_s:
        pb.interval.CopyFrom(duration(schedule.interval_s))
    for field, unix_s in (
        ("next_fire", schedule.next_fire),
        ("last_fire", schedule.last_fire),
        ("created_at", schedule.created_at),
    ):
        if unix_s:
            getattr(pb, field).CopyFrom(timestamp(unix_s))
    return pb
