"""What the CLI prints: tasks and stats as JSON for ``--json``, tasks' outcomes
and plain tables for pipes and files."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from taskfleet.common.client import task_result
from taskfleet.common.codec import decode_result
from taskfleet.common.errors import TaskFailed
from taskfleet.common.model import QueueCounts, Stats, Task, TaskState


def iso_time(unix_s: float, *, local: bool = False) -> str | None:
    """ISO 8601: UTC for scripts, the machine's zone for people; None for 0 (never)."""
    if not unix_s:
        return None
    when = dt.datetime.fromtimestamp(unix_s, dt.UTC)
    return (when.astimezone() if local else when).isoformat(timespec="milliseconds")


def task_json(task: Task, *, local_times: bool = False) -> dict[str, Any]:
    """A task as plain JSON for ``--json`` output (the result decoded, times as
    ISO 8601 in UTC; in local time for ``get``'s own output)."""

    def time(unix_s: float) -> str | None:
        return iso_time(unix_s, local=local_times)

    result: Any = None
    if task.state == TaskState.SUCCEEDED:
        result = decode_result(task.result, task.result_content_type)
        if isinstance(result, bytes):
            result = result.decode(errors="replace")
    return {
        "id": task.id,
        "name": task.spec.name,
        "queue": task.spec.queue,
        "state": task.state.name,
        "attempts": task.attempts,
        "result": result,
        "error": None
        if task.error is None
        else {
            "type": task.error.type,
            "message": task.error.message,
            "traceback": task.error.traceback,
        },
        "worker_id": task.worker_id,
        "metadata": task.spec.metadata,
        "priority": task.spec.priority,
        "max_attempts": task.spec.max_attempts,
        "timeout_s": task.spec.timeout_s,
        "not_before": time(task.spec.not_before),
        "idempotency_key": task.spec.idempotency_key,
        "concurrency_key": task.spec.concurrency_key,
        "concurrency_limit": task.spec.concurrency_limit,
        "created_at": time(task.created_at),
        "started_at": time(task.started_at),
        "finished_at": time(task.finished_at),
        "lost_leases": task.lost_leases,
        "expires_at": time(task.expires_at),
        "progress": task.progress,
        "progress_message": task.progress_message,
    }


def oldest_pending_age_s(counts: QueueCounts, now: float) -> float | None:
    """How long the queue's oldest ready task has waited; None when none is ready."""
    return max(0.0, now - counts.oldest_pending_at) if counts.oldest_pending_at else None


def age_text(age_s: float | None) -> str:
    """An age to the second for people: "45 s", "3 m 12 s", "2 h 5 m", "3 d 4 h";
    "-" for none."""
    if age_s is None:
        return "-"
    s = int(age_s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} m"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def stats_json(stats: Stats) -> dict[str, Any]:
    now = time.time()
    return {
        "queues": [
            {
                "queue": q.queue,
                **{s.name.lower(): q.counts.get(s, 0) for s in TaskState},
                "oldest_pending_age_s": oldest_pending_age_s(q, now),
            }
            for q in stats.queues
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "hostname": w.hostname,
                "pid": w.pid,
                "queues": list(w.queues),
                "task_names": list(w.task_names),
                "concurrency": w.concurrency,
                "running": w.running,
                "peer": w.peer,
                "master_id": w.master_id,
            }
            for w in stats.workers
        ],
        "unserved": [
            {"queue": p.queue, "name": p.name, "pending": p.count} for p in stats.unserved()
        ],
        "masters": [
            {
                "master_id": m.master_id,
                "hostname": m.hostname,
                "pid": m.pid,
                "listen": m.listen,
                "started_at": m.started_at,
                "seen_at": m.seen_at,
            }
            for m in stats.masters
        ],
    }


def outcome_text(task: Task) -> str:
    if task.state == TaskState.SUCCEEDED:
        return show(decode_result(task.result, task.result_content_type))
    if task.error is not None:
        return f"{task.error.type}: {task.error.message}"
    return ""


def show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def print_task_fields(task: Task) -> None:
    """``get`` for a person: one field a line, the empty ones left out."""
    for key, value in task_json(task, local_times=True).items():
        if value not in (None, "", {}, 0) or key in ("state", "attempts"):
            print(f"{key:>12}: {value if isinstance(value, str) else json.dumps(value)}")


def print_result(task: Task) -> None:
    """A finished task's result on stdout, or why it has none on stderr."""
    try:
        print(show(task_result(task)), flush=True)
    except TaskFailed as exc:
        print(f"taskfleet: {exc}", file=sys.stderr, flush=True)


def show_stats(stats: Stats) -> None:
    """``stats`` for a person: rich tables on a terminal, plain ones elsewhere."""
    from taskfleet.common.terminal import is_terminal, print_stats

    if is_terminal(sys.stdout):
        print_stats(stats)
        return
    states = list(TaskState)
    now = time.time()
    rows = [["QUEUE", *(s.name for s in states), "OLDEST PENDING"]]
    rows += [
        [
            q.queue,
            *(str(q.counts.get(s, 0)) for s in states),
            age_text(oldest_pending_age_s(q, now)),
        ]
        for q in stats.queues
    ]
    print_table(rows)
    print()
    rows = [["WORKER", "HOST", "QUEUES", "SLOTS", "RUNNING"]]
    rows += [
        [w.worker_id, w.hostname, ",".join(w.queues), str(w.concurrency), str(w.running)]
        for w in stats.workers
    ]
    print_table(rows)
    unserved = stats.unserved()
    if unserved:
        print()
        print("Pending tasks no connected worker takes:")
        print_table(
            [["QUEUE", "NAME", "PENDING"], *([p.queue, p.name, str(p.count)] for p in unserved)]
        )
    print()
    print_table(
        [
            ["MASTER", "HOST", "LISTEN"],
            *([m.master_id, m.hostname, m.listen] for m in stats.masters),
        ]
    )


def task_row(task: Task) -> list[str]:
    """A task as one row of the `list` table."""
    when = task.finished_at or task.started_at or task.created_at
    stamp = dt.datetime.fromtimestamp(when).astimezone().isoformat(sep=" ", timespec="seconds")
    error = f"{task.error.type}: {task.error.message}" if task.error else ""
    return [
        task.id,
        task.state.name,
        task.spec.name,
        task.spec.queue,
        str(task.attempts),
        stamp,
        error.splitlines()[0][:80] if error else "",
    ]
