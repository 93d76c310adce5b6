"""The dashboard's JSON: tasks, queues, workers and masters as plain dicts.

Times are unix seconds, or null where a task has not reached that point.
Payloads and results are text when they are UTF-8 (JSON usually is), else
base64 in ``*_base64``, so a script gets back exactly the bytes stored.
"""

from __future__ import annotations

import base64
from typing import Any

from taskfleet.common.model import MasterInfo, QueueCounts, Task, TaskState, WorkerInfo

STATE_NAMES = {state: state.name.lower() for state in TaskState}


def state_from_name(name: str) -> TaskState | None:
    try:
        return TaskState[name.upper()]
    except KeyError:
        return None


def _time(value: float) -> float | None:
    return value or None


def _bytes(key: str, data: bytes) -> dict[str, Any]:
    try:
        return {key: data.decode()}
    except UnicodeDecodeError:
        return {key: None, f"{key}_base64": base64.b64encode(data).decode()}


def task_summary(task: Task) -> dict[str, Any]:
    """A task as a list shows it: no payload, result or traceback."""
    return {
        "id": task.id,
        "name": task.spec.name,
        "queue": task.spec.queue,
        "state": STATE_NAMES[task.state],
        "attempts": task.attempts,
        "worker_id": task.worker_id,
        "created_at": _time(task.created_at),
        "started_at": _time(task.started_at),
        "finished_at": _time(task.finished_at),
        "error_type": task.error.type if task.error else None,
    }


def task_detail(task: Task) -> dict[str, Any]:
    spec = task.spec
    error = task.error
    return {
        **task_summary(task),
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "timeout_s": spec.timeout_s,
        "not_before": _time(spec.not_before),
        "idempotency_key": spec.idempotency_key,
        "concurrency_key": spec.concurrency_key,
        "concurrency_limit": spec.concurrency_limit,
        "metadata": dict(spec.metadata),
        "content_type": spec.content_type,
        **_bytes("payload", spec.payload),
        "result_content_type": task.result_content_type,
        **_bytes("result", task.result),
        "error": (
            None
            if error is None
            else {"type": error.type, "message": error.message, "traceback": error.traceback}
        ),
        "lost_leases": task.lost_leases,
        "expires_at": _time(task.expires_at),
        "progress": task.progress,
        "progress_message": task.progress_message,
    }


def queue_counts(counts: QueueCounts) -> dict[str, Any]:
    return {
        "queue": counts.queue,
        **{STATE_NAMES[s]: counts.counts.get(s, 0) for s in TaskState},
        "oldest_pending_at": _time(counts.oldest_pending_at),
    }


def worker(info: WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": info.worker_id,
        "hostname": info.hostname,
        "pid": info.pid,
        "queues": list(info.queues),
        "slots": info.concurrency,
        "running": info.running,  # leased to it: running, or prefetched to run next
        "connected_at": info.connected_at,
        "master_id": info.master_id,
    }


def master(info: MasterInfo) -> dict[str, Any]:
    return {
        "master_id": info.master_id,
        "hostname": info.hostname,
        "pid": info.pid,
        "listen": info.listen,
        "started_at": info.started_at,
    }
