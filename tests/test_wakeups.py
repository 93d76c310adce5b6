"""Which worker streams new work wakes, without the network: each one woken asks
the store for work, so a Submit must wake only workers that can take its tasks,
and only as many as the tasks need."""

from __future__ import annotations

import asyncio
import time

from taskfleet.common.model import WorkerInfo
from taskfleet.master.loop import LoopBridge
from taskfleet.master.sessions import Sessions, WorkerSession


def session(
    worker_id: str, queues: tuple[str, ...], names: tuple[str, ...], credit: int
) -> WorkerSession:
    info = WorkerInfo(
        worker_id=worker_id,
        hostname="h",
        pid=1,
        queues=queues,
        task_names=names,
        concurrency=1,
        running=0,
        peer="",
        connected_at=time.time(),
    )
    s = WorkerSession(info)
    s.credit = credit
    s.changed.clear()
    return s


def woken_by(**hint: object) -> set[str]:
    """The workers of a fixed set that one ``work_available(**hint)`` wakes."""

    async def run() -> set[str]:
        sessions = Sessions(LoopBridge())
        workers = [
            session("a-full", ("a",), (), credit=0),
            session("a-1", ("a",), (), credit=1),
            session("a-2", ("a",), (), credit=2),
            session("a-other-task", ("a",), ("other",), credit=5),
            session("b", ("b",), (), credit=5),
        ]
        for worker in workers:
            sessions.add(worker)
            worker.changed.clear()
        sessions.work_available(**hint)  # type: ignore[arg-type]
        return {w.info.worker_id for w in workers if w.changed.is_set()}

    return asyncio.run(run())


def test_work_wakes_only_workers_with_slots_that_serve_its_queue() -> None:
    assert woken_by(queues={"a"}) == {"a-1", "a-2", "a-other-task"}


def test_work_with_names_skips_workers_that_do_not_run_them() -> None:
    assert woken_by(queues={"a"}, names={"square"}) == {"a-1", "a-2"}


def test_a_few_new_tasks_wake_only_enough_workers_for_them() -> None:
    # One task: the first worker with a free slot is enough
    assert woken_by(queues={"a"}, names={"square"}, tasks=1) == {"a-1"}
    # Two tasks: a-1 has one slot, so a-2 wakes too
    assert woken_by(queues={"a"}, names={"square"}, tasks=2) == {"a-1", "a-2"}


def test_a_delayed_task_coming_due_wakes_every_worker_with_slots() -> None:
    assert woken_by(queues=None) == {"a-1", "a-2", "a-other-task", "b"}


def test_a_hint_from_another_thread_reaches_the_loop() -> None:
    async def run() -> bool:
        sessions = Sessions(LoopBridge())
        worker = session("a-1", ("a",), (), credit=1)
        sessions.add(worker)
        worker.changed.clear()
        await asyncio.to_thread(sessions.work_available, ["a"])
        async with asyncio.timeout(10):
            await worker.changed.wait()
        return worker.work_hint

    assert asyncio.run(run())
