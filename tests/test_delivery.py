"""Nothing is lost, end to end: hard time limits, pool processes that die,
attempt fencing, cancellation of running tasks, idempotent submit, and workers
whose connection is cut or stalled by a TCP proxy.

Real processes throughout: a master with a 2 s lease and 0.5 s heartbeats
(the MasterProc defaults) and real workers; faults are signals, kills and a
``FaultyProxy``. Every wait is a Client.wait or a poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from taskfleet.common import channel as channel_module
from taskfleet.common.channel import open_channel
from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.model import Task, TaskState

from procs import Gates, MasterProc, WorkerProc, alive, poll
from proxy import FaultyProxy

WAIT_S = 30.0
HOLD_S = 1.0  # how long a final task is watched for a late change (two heartbeats)

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def make_proxy() -> Iterator[Callable[[MasterProc], FaultyProxy]]:
    """FaultyProxies in front of masters, closed at teardown."""
    made: list[FaultyProxy] = []

    def make(master: MasterProc) -> FaultyProxy:
        proxy = FaultyProxy(master.port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def final(client: Client, task_id: str, timeout_s: float = WAIT_S) -> Task:
    """The task once it is final; fails if it is not within ``timeout_s``."""
    for task in client.wait([task_id], timeout_s):
        return task
    raise AssertionError(f"task {task_id} not final within {timeout_s} s: {client.get(task_id)}")


def started(gate: str, attempt: int = 1) -> int:
    """Wait for ``attempt`` of the task behind ``gate`` to start; its pid."""
    return poll(lambda: Gates.started(gate, attempt), WAIT_S, f"attempt {attempt} at {gate}")


def listed_id(client: Client, worker: WorkerProc) -> str | None:
    """The id ``worker`` is connected under, or None while it is not connected."""
    return next((w.worker_id for w in client.stats().workers if w.pid == worker.pid), None)


def connected(client: Client, worker: WorkerProc) -> str:
    """Wait until ``worker`` is connected to the master; its worker id."""
    return poll(lambda: listed_id(client, worker), WAIT_S, f"worker {worker.pid} in stats")


def disconnected(client: Client, worker: WorkerProc) -> None:
    """Wait until the master no longer lists ``worker``."""
    poll(lambda: listed_id(client, worker) is None, WAIT_S, f"worker {worker.pid} gone from stats")


def dead(pid: int, what: str) -> None:
    poll(lambda: not alive(pid), WAIT_S, f"{what} (pid {pid}) to be gone")


def busy_neighbour(
    master: MasterProc, client: Client, start_worker: StartWorker, queue_name: str, gates: Gates
) -> tuple[WorkerProc, str, str, str, int]:
    """A process-pool worker with two slots, one held by a blocking task: the worker,
    its id, the task's gate, the task's id and the pid of the process running it."""
    worker = start_worker(master, queues=queue_name, pool="process", concurrency=2)
    worker_id = connected(client, worker)
    gate = gates.new("neighbour")
    task_id = client.submit("block_until", [gate], queue=queue_name)
    return worker, worker_id, gate, task_id, started(gate)


def taken_over(client: Client, task_id: str, gate: str, worker: WorkerProc, worker_id: str) -> int:
    """Wait until the task runs again, on ``worker``, after its first lease lapsed;
    the attempt number it runs as there."""

    def running_there() -> Task | None:
        task = client.get(task_id)
        return task if task.state == TaskState.RUNNING and task.worker_id == worker_id else None

    attempt = poll(running_there, WAIT_S, f"the task to run on {worker_id}").attempts
    assert attempt >= 2
    assert started(gate, attempt) == worker.pid
    return attempt


def assert_done_by(task: Task, worker: WorkerProc, worker_id: str, attempt: int) -> None:
    """``task`` SUCCEEDED with the result of ``worker``'s ``attempt`` (a ``gated`` task)."""
    assert task.state == TaskState.SUCCEEDED
    assert task.worker_id == worker_id
    assert task_result(task) == {"attempt": attempt, "pid": worker.pid}


def assert_stays(client: Client, task: Task, hold_s: float = HOLD_S) -> None:
    """``task`` (final) reads the same, field for field, throughout ``hold_s``."""
    # A window to watch in, not a synchronisation: callers have already waited
    # for the late result to reach the master (see ``ran_on``).
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        assert client.get(task.id) == task
        time.sleep(0.05)


def ran_on(client: Client, worker: WorkerProc, queue: str) -> str:
    """Run a task on ``queue`` (which only ``worker`` serves) and check that
    ``worker`` ran it; returns the id. Since the worker reports in order, what
    it sent before has reached the master once this returns."""
    task = final(client, client.submit("getpid", queue=queue))
    assert task.state == TaskState.SUCCEEDED, task.error
    assert task_result(task) == worker.pid
    return task.id


# -- 1. hard time limits -----------------------------------------------------------


def test_time_limit_kills_and_replaces_the_pool_process_while_the_other_slot_runs_on(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a process-pool worker with two slots, one busy with a blocking task
    worker, the_worker, neighbour_gate, neighbour, neighbour_pid = busy_neighbour(
        master, client, start_worker, queue_name, gates
    )

    # When a task that would block for a minute runs with a 1 s limit and 2 attempts
    hang = gates.new("never-opened")
    limited = client.submit("block_until", [hang], queue=queue_name, timeout_s=1.0, max_attempts=2)

    # Then both attempts are killed at the limit and the task ends FAILED
    task = final(client, limited)
    assert task.state == TaskState.FAILED
    assert task.error is not None and task.error.type == "TimeLimitExceeded"
    assert task.attempts == 2
    assert task.worker_id == the_worker

    # each attempt in a process of its own, killed and not the neighbour's
    first, second = Gates.started(hang, 1), Gates.started(hang, 2)
    assert first is not None and second is not None, "an attempt timed out before it ran"
    assert len({first, second, neighbour_pid}) == 3
    dead(first, "the process of attempt 1")
    dead(second, "the process of attempt 2")

    # When a task whose spec sets no limit has one from @task(timeout_s=1)
    default_hang = gates.new("never-opened-either")
    by_default = final(
        client, client.submit("block_under_default_limit", [default_hang], queue=queue_name)
    )

    # Then that limit applies (and, with no max_attempts anywhere, one attempt only)
    assert by_default.state == TaskState.FAILED
    assert by_default.error is not None and by_default.error.type == "TimeLimitExceeded"
    assert by_default.attempts == 1
    third = Gates.started(default_hang, 1)
    assert third is not None
    dead(third, "the process of the default-limited task")

    # And all along the neighbour ran on in its own process, to success
    assert client.get(neighbour).state == TaskState.RUNNING
    assert alive(neighbour_pid)
    gates.open(neighbour_gate)
    neighbour_task = final(client, neighbour)
    assert neighbour_task.state == TaskState.SUCCEEDED
    assert task_result(neighbour_task) == "released"
    assert neighbour_task.attempts == 1

    # And the worker serves on from fresh processes
    fresh = final(client, client.submit("getpid", queue=queue_name))
    assert fresh.state == TaskState.SUCCEEDED
    assert task_result(fresh) not in {first, second, third}
    assert fresh.worker_id == the_worker
    assert worker.popen.poll() is None


# -- 2. pool process death -------------------------------------------------------


def test_a_dying_pool_process_fails_its_attempt_naming_why_and_the_worker_serves_on(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a process-pool worker with two slots, one busy with a blocking task
    worker, the_worker, neighbour_gate, neighbour, neighbour_pid = busy_neighbour(
        master, client, start_worker, queue_name, gates
    )

    # When a task ends its own process with os._exit(7)
    exited = final(client, client.submit("exit_with", [7], queue=queue_name))

    # Then that attempt fails as WorkerLost, naming the exit code
    assert exited.state == TaskState.FAILED
    assert exited.error is not None and exited.error.type == "WorkerLost"
    assert "exited with code 7" in exited.error.message
    assert exited.attempts == 1

    # When another task's process is SIGKILLed from outside, as the OOM killer would
    victim_gate = gates.new("victim")
    victim = client.submit("block_until", [victim_gate], queue=queue_name)
    victim_pid = started(victim_gate)
    assert victim_pid not in {neighbour_pid, worker.pid}
    os.kill(victim_pid, signal.SIGKILL)

    # Then that attempt fails as WorkerLost, naming the signal
    killed = final(client, victim)
    assert killed.state == TaskState.FAILED
    assert killed.error is not None and killed.error.type == "WorkerLost"
    assert "SIGKILL" in killed.error.message
    assert killed.worker_id == the_worker

    # And the same worker process serves the next task, from a fresh pool process
    after = final(client, client.submit("getpid", queue=queue_name))
    assert after.state == TaskState.SUCCEEDED
    assert after.worker_id == the_worker
    assert task_result(after) not in {victim_pid, neighbour_pid}
    assert worker.popen.poll() is None

    # And the neighbour that ran through both deaths was neither lost nor restarted
    assert client.get(neighbour).state == TaskState.RUNNING
    gates.open(neighbour_gate)
    neighbour_task = final(client, neighbour)
    assert neighbour_task.state == TaskState.SUCCEEDED
    assert (neighbour_task.attempts, neighbour_task.worker_id) == (1, the_worker)
    assert Gates.started(neighbour_gate, 2) is None


# -- 3. fencing ----------------------------------------------------------------------


def test_late_result_of_a_frozen_worker_presumed_dead_is_fenced(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given worker A (which also serves a queue of its own) running a gated task
    own_queue = f"{queue_name}-a"
    worker_a = start_worker(master, queues=f"{queue_name},{own_queue}", pool="thread")
    a_id = connected(client, worker_a)
    gate = gates.new("gate")
    task_id = client.submit("gated", [gate], queue=queue_name)
    assert started(gate) == worker_a.pid

    # When A freezes (SIGSTOP) until the master gives up on it, and worker B starts
    worker_a.freeze()
    disconnected(client, worker_a)
    worker_b = start_worker(master, queues=queue_name, pool="thread")
    b_id = connected(client, worker_b)

    # Then the lapsed lease is handed to B, in a later attempt
    attempt = taken_over(client, task_id, gate, worker_b, b_id)

    # When the gate opens, B's attempt succeeds with B's result
    gates.open(gate)
    done = final(client, task_id)
    assert_done_by(done, worker_b, b_id, attempt)

    # When A thaws: its attempt 1 finishes (the gate is open) and it reconnects
    worker_a.signal(signal.SIGCONT)
    assert connected(client, worker_a) == a_id

    # Then A takes new work, and its late result changed nothing
    ran_on(client, worker_a, own_queue)
    assert_stays(client, done)


# -- 4. cancellation ---------------------------------------------------------------


def test_cancel_stops_running_tasks_in_both_pools_and_a_cancelled_pending_task_never_runs(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a process-pool worker and a one-slot thread-pool worker without
    # prefetch, each on a queue of its own
    process_queue, thread_queue = f"{queue_name}-process", f"{queue_name}-thread"
    process_worker = start_worker(master, queues=process_queue, pool="process", concurrency=2)
    thread_worker = start_worker(
        master, queues=thread_queue, pool="thread", concurrency=1, extra=["--prefetch", "0"]
    )
    process_id = connected(client, process_worker)
    thread_id = connected(client, thread_worker)

    # When a task running in the process pool is cancelled
    in_process_gate = gates.new("in-process")
    in_process = client.submit("block_until", [in_process_gate], queue=process_queue)
    pool_pid = started(in_process_gate)
    assert client.cancel(in_process).state == TaskState.CANCELLED

    # Then the process running it is killed, and the worker serves on from a fresh one
    dead(pool_pid, "the pool process running the cancelled task")
    after = final(client, client.submit("getpid", queue=process_queue))
    assert after.state == TaskState.SUCCEEDED
    assert after.worker_id == process_id
    assert task_result(after) != pool_pid
    assert client.get(in_process).state == TaskState.CANCELLED

    # Given the thread worker's only slot busy, and a task queued behind it
    in_thread_gate, never_gate = gates.new("in-thread"), gates.new("never")
    in_thread = client.submit("block_until", [in_thread_gate], queue=thread_queue)
    started(in_thread_gate)
    pending = client.submit("block_until", [never_gate], queue=thread_queue)
    assert client.get(pending).state == TaskState.PENDING

    # When the queued task is cancelled, a task is queued behind it, and the
    # running one is cancelled too (its function returns only once its gate opens)
    assert client.cancel(pending).state == TaskState.CANCELLED
    behind = client.submit("square", [7], queue=thread_queue)
    assert client.cancel(in_thread).state == TaskState.CANCELLED
    gates.open(in_thread_gate)

    # Then the task behind runs once the slot is free...
    behind_task = final(client, behind)
    assert behind_task.state == TaskState.SUCCEEDED
    assert (task_result(behind_task), behind_task.worker_id) == (49, thread_id)
    # ...the cancelled running task stays CANCELLED although its function returned...
    thread_task = client.get(in_thread)
    assert (thread_task.state, thread_task.result) == (TaskState.CANCELLED, b"")
    # ...and the cancelled pending one never ran, though FIFO put it first
    pending_task = client.get(pending)
    assert (pending_task.state, pending_task.attempts) == (TaskState.CANCELLED, 0)
    assert Gates.started(never_gate, 1) is None


# -- 5. idempotent submit ------------------------------------------------------------


def queue_total(client: Client, queue: str) -> int:
    return sum(
        sum(counts.counts.values()) for counts in client.stats().queues if counts.queue == queue
    )


def test_a_repeated_idempotency_key_returns_the_first_task(client: Client, queue_name: str) -> None:
    # Given a task submitted with an idempotency key (no worker: it stays PENDING)
    first = client.submit("square", [1], queue=queue_name, idempotency_key="k1")

    # When the same key is submitted again, alone and within batches
    again = client.submit("square", [1], queue=queue_name, idempotency_key="k1")
    batch = client.submit_many(
        make_spec("square", [n], queue=queue_name, idempotency_key=key)
        for n, key in [(2, "k2"), (1, "k1"), (2, "k2"), (3, "k3")]
    )

    # Then every repeat gets the id of the key's first task, and only 3 tasks exist
    assert again == first
    assert batch[1] == first
    assert batch[0] == batch[2]
    assert len({first, batch[0], batch[3]}) == 3
    assert queue_total(client, queue_name) == 3


class SubmitCalls(grpc.UnaryUnaryClientInterceptor):
    """Watches the Submit calls a client makes: a probe, not a fake."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/Submit"):
            self.codes.append(outcome.code())
        return outcome

    def failed(self) -> int:
        return sum(code == grpc.StatusCode.UNAVAILABLE for code in self.codes)


def test_client_retries_keyed_submits_through_a_cut_without_duplicates(
    master: MasterProc,
    client: Client,
    make_proxy: Callable[[MasterProc], FaultyProxy],
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a client that reaches the master through a proxy that is cut
    proxy = make_proxy(master)
    calls = SubmitCalls()
    monkeypatch.setattr(
        channel_module,
        "open_channel",
        lambda target, token="", **tls: grpc.intercept_channel(
            open_channel(target, token, **tls), calls
        ),
    )
    proxy.cut()
    keys = [f"{queue_name}-{n}" for n in range(20)]
    specs = [
        make_spec("square", [n], queue=queue_name, idempotency_key=k) for n, k in enumerate(keys)
    ]

    # When it submits keyed tasks, and the proxy is restored once a call has failed
    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            with Client(proxy.address) as through_proxy:
                outcome["ids"] = through_proxy.submit_many(specs)
        except Exception as exc:  # reported by the test, not lost in the thread
            outcome["error"] = exc

    submitter = threading.Thread(target=submit, name="submitter")
    submitter.start()
    poll(lambda: calls.failed() >= 1 or not submitter.is_alive(), WAIT_S, "a Submit to fail")
    proxy.restore()
    submitter.join(WAIT_S)

    # Then the submit completes after retrying...
    assert not submitter.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert calls.failed() >= 1
    assert calls.codes[-1] == grpc.StatusCode.OK
    # ...and the master holds each key exactly once
    ids = outcome["ids"]
    assert len(set(ids)) == len(keys)
    assert client.submit_many(specs) == ids
    assert queue_total(client, queue_name) == len(keys)


# -- 6. no zombies: a proxy between worker and master ---------------------------------


def test_worker_cut_off_briefly_reconnects_reports_its_task_and_takes_new_work(
    start_master: StartMaster,
    start_worker: StartWorker,
    make_proxy: Callable[[MasterProc], FaultyProxy],
    queue_name: str,
    gates: Gates,
) -> None:
    # Given a worker connected through a proxy, running a gated task; the lease
    # is long enough to outlast the cut
    master = start_master(lease_s=6.0)
    proxy = make_proxy(master)
    worker = start_worker(proxy.address, queues=queue_name, pool="thread", wait_connected=False)
    with master.client() as client:
        the_worker = connected(client, worker)
        gate = gates.new("gate")
        task_id = client.submit("block_until", [gate], queue=queue_name)
        started(gate)

        # When the proxy cuts the connection, the task finishes meanwhile, and
        # the proxy is restored
        proxy.cut()
        disconnected(client, worker)
        gates.open(gate)
        proxy.restore()

        # Then the same worker reconnects by itself...
        assert connected(client, worker) == the_worker
        # ...reports the task under the lease it still held...
        task = final(client, task_id)
        assert task.state == TaskState.SUCCEEDED
        assert task_result(task) == "released"
        assert (task.attempts, task.worker_id) == (1, the_worker)
        # ...and takes new tasks
        after = final(client, client.submit("square", [6], queue=queue_name))
        assert (task_result(after), after.worker_id) == (36, the_worker)


def test_worker_behind_a_stalled_proxy_is_dropped_and_comes_back_after_restore(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    make_proxy: Callable[[MasterProc], FaultyProxy],
    queue_name: str,
) -> None:
    # Given a worker that works through a proxy
    proxy = make_proxy(master)
    worker = start_worker(proxy.address, queues=queue_name, pool="thread", wait_connected=False)
    the_worker = connected(client, worker)
    before = final(client, client.submit("square", [4], queue=queue_name))
    assert (task_result(before), before.worker_id) == (16, the_worker)
    assert proxy.connections == 1

    # When the proxy stalls: connections stay open, nothing flows
    proxy.stall()

    # Then the worker gives up on its silent stream and dials again...
    poll(lambda: proxy.connections >= 2, WAIT_S, "the worker to dial again")
    # ...and the master drops the silent session
    disconnected(client, worker)

    # When the proxy forwards again
    proxy.restore()

    # Then the same worker is back and runs a task submitted now
    assert connected(client, worker) == the_worker
    after = final(client, client.submit("square", [5], queue=queue_name))
    assert (task_result(after), after.worker_id) == (25, the_worker)


def test_worker_cut_off_past_its_lease_is_fenced_and_then_takes_work_again(
    master: MasterProc,
    client: Client,
    start_worker: StartWorker,
    make_proxy: Callable[[MasterProc], FaultyProxy],
    queue_name: str,
    gates: Gates,
) -> None:
    # Given worker A behind a proxy (also serving a queue of its own) running a
    # gated task, and worker B connected directly
    own_queue = f"{queue_name}-a"
    proxy = make_proxy(master)
    worker_a = start_worker(
        proxy.address, queues=f"{queue_name},{own_queue}", pool="thread", wait_connected=False
    )
    a_id = connected(client, worker_a)
    gate = gates.new("gate")
    task_id = client.submit("gated", [gate], queue=queue_name)
    assert started(gate) == worker_a.pid
    worker_b = start_worker(master, queues=queue_name, pool="thread")
    b_id = connected(client, worker_b)

    # When A's connection is cut for longer than the lease
    proxy.cut()
    disconnected(client, worker_a)

    # Then the task runs again on B
    attempt = taken_over(client, task_id, gate, worker_b, b_id)

    # When the gate opens, both attempts finish: B's is recorded
    gates.open(gate)
    done = final(client, task_id)
    assert_done_by(done, worker_b, b_id, attempt)

    # When the proxy is restored, A reconnects with its late result
    proxy.restore()
    assert connected(client, worker_a) == a_id

    # Then A takes work again, and its late result changed nothing
    ran_on(client, worker_a, own_queue)
    assert_stays(client, done)
