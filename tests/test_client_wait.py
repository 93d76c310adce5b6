"""``Client.wait`` and ``Client.result`` beyond one call: more ids than the master
takes at once, and a master that stops or restarts while they wait.

Tasks are put on a queue no worker serves and made final by cancelling them,
so the only processes are masters; a sqlite store in ``tmp_path`` carries the
tasks across a restart on the same port.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskfleet.common.client import Client, make_spec
from taskfleet.common.errors import TaskFailed, TaskfleetError, Unavailable
from taskfleet.common.model import Task, TaskState

from procs import MasterProc, poll

StartMaster = Callable[..., MasterProc]
END = "end"  # what a waiting thread puts once the wait returned
WAIT_FOR_THREAD_S = 60.0


class Waiter:
    """Runs ``call`` in a thread; what it yields, returns or raises arrives on ``events``."""

    def __init__(self, call: Callable[[], Iterator[object]]) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Iterator[object]]) -> None:
        try:
            for item in call():
                self.events.put(item)
            self.events.put(END)
        except BaseException as exc:  # handed to the test, which asserts on it
            self.events.put(exc)

    def next(self) -> object:
        return self.events.get(timeout=WAIT_FOR_THREAD_S)


@pytest.fixture
def durable_master(start_master: StartMaster, tmp_path: Path) -> MasterProc:
    return start_master(store=f"sqlite:{tmp_path / 'tasks.db'}")


def restart(old: MasterProc, start_master: StartMaster, tmp_path: Path) -> MasterProc:
    """Stop ``old`` gracefully (SIGTERM) and start a master on its port and store."""
    assert old.stop() == 0, old.output()
    return start_master(store=f"sqlite:{tmp_path / 'tasks.db'}", port=old.port)


def one_final_one_pending(client: Client, queue_name: str) -> tuple[str, str]:
    done, pending = client.submit_many(make_spec("square", [n], queue=queue_name) for n in (1, 2))
    client.cancel(done)
    return done, pending


def test_wait_resumes_across_a_master_restart(
    durable_master: MasterProc, start_master: StartMaster, tmp_path: Path, queue_name: str
) -> None:
    # Given a wait for a final task and a pending one, its stream open (the final
    # task has arrived through it)
    with durable_master.client() as client:
        done, pending = one_final_one_pending(client, queue_name)
        waiter = Waiter(lambda: client.wait([done, pending], timeout_s=120))
        first = waiter.next()
        assert isinstance(first, Task) and first.id == done

        # when the master is stopped and started again on the same port and store
        restarted = restart(durable_master, start_master, tmp_path)
        # and the pending task then ends
        with restarted.client() as other:
            other.cancel(pending)

        # then the same wait goes on and reports it, and only then ends
        second = waiter.next()
        assert isinstance(second, Task), second
        assert (second.id, second.state) == (pending, TaskState.CANCELLED)
        assert waiter.next() == END


def test_result_resumes_across_a_master_restart(
    durable_master: MasterProc, start_master: StartMaster, tmp_path: Path, queue_name: str
) -> None:
    # Given a caller waiting for the result of a pending task
    with durable_master.client() as client:
        task_id = client.submit("square", [3], queue=queue_name)

        def result() -> Iterator[object]:
            yield client.result(task_id, timeout_s=120)

        waiter = Waiter(result)

        # when the master restarts and the task then ends
        restarted = restart(durable_master, start_master, tmp_path)
        with restarted.client() as other:
            other.cancel(task_id)

        # then the caller learns how it ended, not that it timed out
        outcome = waiter.next()
        assert isinstance(outcome, TaskFailed), outcome
        assert (outcome.task_id, outcome.state) == (task_id, "CANCELLED")


def test_run_resumes_across_a_master_restart(
    durable_master: MasterProc, start_master: StartMaster, tmp_path: Path, queue_name: str
) -> None:
    # Given a caller in Client.run on a task no worker takes, the task stored
    key = f"run-{queue_name}"
    with durable_master.client() as client:

        def run() -> Iterator[object]:
            yield client.run("square", [3], queue=queue_name, idempotency_key=key, timeout_s=120)

        waiter = Waiter(run)
        poll(lambda: queue_name in [q.queue for q in client.stats().queues], what="the submit")

        # when the master restarts and the task then ends
        restarted = restart(durable_master, start_master, tmp_path)
        with restarted.client() as other:
            task_id = other.submit("square", [3], queue=queue_name, idempotency_key=key)
            other.cancel(task_id)

        # then the caller learns how it ended
        outcome = waiter.next()
        assert isinstance(outcome, TaskFailed), outcome
        assert (outcome.task_id, outcome.state) == (task_id, "CANCELLED")


@pytest.mark.parametrize("deadline_s", [3.0, None])
def test_a_master_that_stays_away_is_unavailable_not_a_short_answer(
    durable_master: MasterProc,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    deadline_s: float | None,
) -> None:
    # Given a wait whose stream is open, with a deadline of 3 s or none (then it
    # resumes for RESUME_WAIT_S, shortened here to 3 s)
    if deadline_s is None:
        monkeypatch.setattr("taskfleet.common.waits.RESUME_WAIT_S", 3.0)
    with durable_master.client() as client:
        done, pending = one_final_one_pending(client, queue_name)
        waiter = Waiter(lambda: client.wait([done, pending], timeout_s=deadline_s))
        first = waiter.next()
        assert isinstance(first, Task) and first.id == done

        # when the master stops for good
        assert durable_master.stop() == 0

        # then the wait raises Unavailable rather than ending as if it timed out
        outcome = waiter.next()
        assert isinstance(outcome, Unavailable), outcome
        assert "1 task(s)" in str(outcome)


def test_result_of_a_master_that_stays_away_is_unavailable(
    durable_master: MasterProc, queue_name: str
) -> None:
    with durable_master.client() as client:
        task_id = client.submit("square", [3], queue=queue_name)
        assert durable_master.stop() == 0
        with pytest.raises(Unavailable):
            client.result(task_id, timeout_s=3)


def test_wait_for_more_ids_than_one_call_takes(client: Client, queue_name: str) -> None:
    # Given just over the 100,000 ids the master takes in one wait, one final
    # task among the first 100,000 and one after them
    task_ids = client.submit_many(
        make_spec("square", [n], queue=queue_name) for n in range(100_001)
    )
    client.cancel(task_ids[0])
    client.cancel(task_ids[-1])

    # when the client waits for all of them, briefly
    try:
        finished = list(client.wait(task_ids, timeout_s=1))
    except TaskfleetError as exc:
        pytest.fail(f"the wait was refused: {exc}")

    # then both final tasks come back, and only they
    assert sorted(t.id for t in finished) == sorted([task_ids[0], task_ids[-1]])
    assert {t.state for t in finished} == {TaskState.CANCELLED}
