"""The worker's protobuf edge: every message it sends to the master, and the
job it makes of an assignment. The rest of the worker sees plain Jobs,
LeaseRefs and Outcomes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable

from taskfleet.common import convert
from taskfleet.common.codec import utf8_text
from taskfleet.common.config import WorkerConfig
from taskfleet.common.model import LeaseRef, Outcome, Progress, TaskError, TaskState
from taskfleet.v1 import worker_pb2
from taskfleet.worker.execute import Job, safe_str
from taskfleet.worker.registry import TaskDefinition


def hello(
    worker_id: str, config: WorkerConfig, task_names: list[str], held: Iterable[LeaseRef]
) -> worker_pb2.WorkerMessage:
    """The first message of a stream: who this worker is and what it still holds."""
    return worker_pb2.WorkerMessage(
        hello=worker_pb2.Hello(
            worker_id=worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=config.queues,
            task_names=task_names,
            concurrency=config.slots,
            held=[convert.ref_to_proto(r) for r in held],
        )
    )


def heartbeat(held: Iterable[LeaseRef]) -> worker_pb2.WorkerMessage:
    """Renew the leases of ``held``."""
    return worker_pb2.WorkerMessage(
        heartbeat=worker_pb2.Heartbeat(held=[convert.ref_to_proto(r) for r in held])
    )


def progress(updates: dict[LeaseRef, tuple[float, str]]) -> worker_pb2.WorkerMessage:
    """The latest progress of each task in ``updates``."""
    return worker_pb2.WorkerMessage(
        progress=worker_pb2.ProgressBatch(
            updates=[
                convert.progress_to_proto(Progress(ref, fraction, text))
                for ref, (fraction, text) in updates.items()
            ]
        )
    )


def credit(tasks: int) -> worker_pb2.WorkerMessage:
    """Ask for ``tasks`` more."""
    return worker_pb2.WorkerMessage(credit=worker_pb2.Credit(tasks=tasks))


def release(jobs: Iterable[Job]) -> worker_pb2.WorkerMessage:
    """Give back jobs that have not started."""
    return worker_pb2.WorkerMessage(
        release=worker_pb2.Release(leases=[convert.ref_to_proto(j.ref) for j in jobs])
    )


def results(seq: int, outcomes: list[Outcome], credit: int = 0) -> worker_pb2.WorkerMessage:
    """One Results batch, its outcomes written straight into the repeated field."""
    message = worker_pb2.WorkerMessage()
    batch = message.results
    batch.seq = seq
    if credit:
        batch.credit = credit
    add = batch.outcomes.add
    for outcome in outcomes:
        pb = add()
        try:
            convert.fill_outcome(pb, outcome)
        except (ValueError, TypeError, OverflowError) as exc:
            # A field protobuf refuses. The batch must go all the same: one that
            # could not be built would never be acknowledged, and the worker
            # would send nothing more.
            pb.Clear()
            convert.fill_outcome(pb, _unsendable(outcome, exc))
    return message


def _unsendable(outcome: Outcome, exc: Exception) -> Outcome:
    """The outcome reported in place of one protobuf refuses: the attempt failed."""
    error = TaskError(
        "OutcomeNotSendable", utf8_text(f"the attempt's outcome could not be sent: {safe_str(exc)}")
    )
    return Outcome(outcome.ref, TaskState.FAILED, error=error, no_retry=True)


def job(assignment: worker_pb2.Assignment, registry: dict[str, TaskDefinition]) -> Job:
    """The job of ``assignment``; a limit the spec leaves open comes from the @task."""
    task = assignment.task
    spec = task.spec  # once: every protobuf field access has a cost, per task
    definition = registry.get(spec.name)
    timeout_s = convert.seconds_from_duration(spec.timeout) if spec.HasField("timeout") else 0.0
    if not timeout_s and definition is not None:
        timeout_s = definition.timeout_s
    return Job(
        ref=convert.ref_from_proto(assignment.lease),
        name=spec.name,
        queue=spec.queue,
        attempt=task.attempts,
        payload=spec.payload,
        content_type=spec.content_type,
        timeout_s=timeout_s,
        deadline=time.time() + timeout_s if timeout_s else None,
        metadata=dict(spec.metadata) if spec.metadata else {},
        max_attempts=spec.max_attempts or (definition.max_attempts if definition else 1),
    )
