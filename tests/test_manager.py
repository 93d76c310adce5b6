"""Classic multiprocessing.managers programs working with taskfleet unchanged.

The programs in ``tests/classic/`` are written as the tutorials write them,
port and authkey in their text. Each test runs a copy with only the port
number replaced (ports must be free), in a session of its own, so stopping it
also stops the manager server process it may have forked.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import pytest

from taskfleet.common.client import task_result
from taskfleet.common.model import TaskState
from taskfleet.common.shutdown import EXIT_FORCED

from procs import TESTS_DIR, Gates, MasterProc, WorkerProc, alive, free_port, poll

CLASSIC_DIR = TESTS_DIR / "classic"
CLASSIC_PORT_TEXT = ", 5000)"  # how the classic programs name their port
AUTHKEY = "abc"  # the key the classic programs carry in their text
RUN_TIMEOUT_S = 40.0


class ClassicProc:
    """A classic program run as is, in its own session (stopped by process group)."""

    def __init__(self, path: Path) -> None:
        self.log_path = path.with_suffix(f".{os.urandom(3).hex()}.log")
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=path.parent,
                env=_env(),
                start_new_session=True,
            )

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        return self.popen.wait(timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self) -> str:
        """Wait for a clean exit and return the output."""
        code = self.wait()
        output = self.output()
        assert code == 0, output
        return output


class ManagerClient(BaseManager):
    """A client as the classic programs write one, for checks made from the test."""


ManagerClient.register("get_task_queue")
ManagerClient.register("get_result_queue")


@pytest.fixture
def run_classic(tmp_path: Path) -> Iterator[Callable[[str, int], ClassicProc]]:
    started: list[ClassicProc] = []

    def run(name: str, port: int) -> ClassicProc:
        text = (CLASSIC_DIR / name).read_text()
        assert text.count(CLASSIC_PORT_TEXT) == 1, f"{name} names its port once"
        path = tmp_path / name
        path.write_text(text.replace(CLASSIC_PORT_TEXT, f", {port})"))
        proc = ClassicProc(path)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill()


def manager_master(
    start_master: Callable[..., MasterProc],
    port: int,
    authkey: str = AUTHKEY,
    extra: list[str] | None = None,
    store: str = "memory",
) -> MasterProc:
    """A taskfleet master serving the classic queues on ``port``, bridged to task square."""
    flags = ["--manager-listen", f"127.0.0.1:{port}", "--authkey", authkey]
    return start_master(store=store, extra=[*flags, "--manager-task", "square", *(extra or [])])


def connect(port: int, authkey: str = AUTHKEY) -> ManagerClient:
    manager = ManagerClient(address=("127.0.0.1", port), authkey=authkey.encode())
    manager.connect()
    return manager


def put_and_results(output: str) -> tuple[list[int], list[str]]:
    numbers = [int(n) for n in re.findall(r"^Put task (\d+)\.\.\.$", output, re.M)]
    return numbers, re.findall(r"^Result: (.*)$", output, re.M)


# -- a classic master served by taskfleet workers -------------------------------


def test_classic_master_is_served_by_a_taskfleet_worker_across_restarts(
    start_worker: Callable[..., WorkerProc], run_classic: Callable[[str, int], ClassicProc]
) -> None:
    # Given a taskfleet worker started before the classic master is up
    port = free_port()
    worker = start_worker(
        f"127.0.0.1:{port}",
        extra=["--transport", "manager", "--authkey", AUTHKEY, "--manager-task", "square"],
        wait_connected=False,
    )
    # When the classic master runs, exits, and runs again on the same port
    for _ in range(2):
        output = run_classic("task_master.py", port).finish()
        # Then each run gets the squares of the numbers it put
        numbers, results = put_and_results(output)
        assert len(numbers) == 10
        assert sorted(int(r) for r in results) == sorted(n * n for n in numbers)
        assert worker.popen.poll() is None, worker.output()
    assert "connection to manager lost" in worker.output()
    assert worker.stop() == 0, worker.output()


def test_manager_worker_never_prints_the_authkey_and_drains_while_reconnecting(
    start_worker: Callable[..., WorkerProc],
) -> None:
    secret = f"tf-secret-{os.urandom(4).hex()}"
    worker = start_worker(
        f"127.0.0.1:{free_port()}",  # nobody there
        extra=["--transport", "manager", "--authkey", secret, "--manager-task", "square"],
        wait_connected=False,
    )
    poll(lambda: "unreachable" in worker.output(), 20, "the worker to retry")
    assert worker.stop() == 0
    assert secret not in worker.output()


def test_manager_worker_second_sigterm_exits_at_once_with_its_pool(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    gates: Gates,
) -> None:
    # Given a process-pool manager worker running a blocking item
    port = free_port()
    flags = ["--manager-listen", f"127.0.0.1:{port}", "--authkey", AUTHKEY]
    master = start_master(extra=[*flags, "--manager-task", "block_until"])
    worker = start_worker(
        f"127.0.0.1:{port}",
        pool="process",
        extra=["--transport", "manager", "--authkey", AUTHKEY, "--manager-task", "block_until"],
        wait_connected=False,
    )
    gate = gates.new("h")
    with master.client() as client:
        client.submit("block_until", [gate])
    poll(lambda: gates.started(gate, 1), 20, "the item to start")
    pool_pid = gates.started(gate, 1)
    assert pool_pid is not None and pool_pid != worker.pid

    # When it gets SIGTERM, starts draining, and gets a second SIGTERM
    worker.signal(signal.SIGTERM)
    poll(lambda: "draining" in worker.output(), 20, "the drain to begin")
    worker.signal(signal.SIGTERM)

    # Then it exits at once with EXIT_FORCED and takes its pool process with it
    assert worker.wait(20) == EXIT_FORCED
    poll(lambda: not alive(pool_pid), 20, "the pool process to be gone")


# -- classic programs served by a taskfleet master --------------------------------


def test_classic_worker_does_grpc_submitted_tasks(
    start_master: Callable[..., MasterProc], run_classic: Callable[[str, int], ClassicProc]
) -> None:
    # Given tasks submitted through gRPC to a master with the manager endpoint
    port = free_port()
    master = manager_master(start_master, port)
    numbers = random.sample(range(10_000), 10)
    with master.client() as client:
        ids = [client.submit("square", [n]) for n in numbers]
        # When the classic worker runs against it
        output = run_classic("task_worker.py", port).finish()
        assert "worker exit." in output
        # Then its strings are the tasks' results, visible through WaitTasks and GetTask
        done = {t.id: t for t in client.wait(ids, timeout_s=10)}
        assert [done[i].state for i in ids] == [TaskState.SUCCEEDED] * 10
        assert [task_result(done[i]) for i in ids] == [f"{n} * {n} = {n * n}" for n in numbers]
        assert all(done[i].worker_id.startswith("manager:127.0.0.1:") for i in ids)
        assert task_result(client.get(ids[0])) == f"{numbers[0]} * {numbers[0]} = {numbers[0] ** 2}"


def test_several_classic_workers_share_the_work(
    start_master: Callable[..., MasterProc], run_classic: Callable[[str, int], ClassicProc]
) -> None:
    port = free_port()
    master = manager_master(start_master, port)
    with master.client() as client:
        ids = [client.submit("square", [n]) for n in range(30)]
        # Each classic worker takes at most 10 tasks, so all three must take part.
        workers = [run_classic("task_worker.py", port) for _ in range(3)]
        for worker in workers:
            worker.finish()
        done = list(client.wait(ids, timeout_s=10))
    assert sorted(task_result(t) for t in done) == sorted(f"{n} * {n} = {n * n}" for n in range(30))
    assert len({t.worker_id for t in done}) == 3


def test_classic_producer_is_served_by_taskfleet_grpc_workers(
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
    run_classic: Callable[[str, int], ClassicProc],
) -> None:
    # Given a master with the manager endpoint and two ordinary gRPC workers
    port = free_port()
    master = manager_master(start_master, port)
    start_worker(master)
    start_worker(master)
    # When the classic producer puts its numbers and reads the results
    output = run_classic("task_producer.py", port).finish()
    # Then it gets every square back, and gRPC sees the tasks as any others
    numbers, results = put_and_results(output)
    assert len(numbers) == 10
    assert sorted(int(r) for r in results) == sorted(n * n for n in numbers)
    with master.client() as client:
        (default,) = [q for q in client.stats().queues if q.queue == "default"]
        assert default.counts[TaskState.SUCCEEDED] == 10
        # And a task that fails comes back as a RuntimeError saying why
        manager = connect(port)
        manager.get_task_queue().put("not a number")  # type: ignore[attr-defined]
        failure = manager.get_result_queue().get(timeout=10)  # type: ignore[attr-defined]
    assert isinstance(failure, RuntimeError)
    assert "FAILED: TypeError" in str(failure)


# -- the bridge's queue semantics --------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_manager_queues_behave_like_queue_queue(
    tmp_path: Path, start_master: Callable[..., MasterProc], store: str
) -> None:
    port = free_port()
    url = f"sqlite:{tmp_path / 'tasks.db'}" if store == "sqlite" else store
    master = manager_master(start_master, port, store=url)
    manager = connect(port)
    tasks: Any = manager.get_task_queue()  # type: ignore[attr-defined]
    results: Any = manager.get_result_queue()  # type: ignore[attr-defined]
    with master.client() as client:
        # A task with one argument comes as that argument; any other as a dict.
        two_args = client.submit("square", [2, 3])
        one_arg = client.submit("square", [7])
        assert (tasks.qsize(), tasks.empty(), tasks.full()) == (2, False, False)
        assert tasks.get(timeout=5) == {
            "id": two_args,
            "name": "square",
            "args": [2, 3],
            "kwargs": {},
        }
        assert tasks.get_nowait() == 7
        with pytest.raises(queue.Empty):
            tasks.get(timeout=0.2)
        with pytest.raises(queue.Empty):
            tasks.get_nowait()
        # What the connection puts back is recorded, in order, as those tasks' results.
        results.put("first")
        results.put_nowait(49)
        assert task_result(client.get(two_args)) == "first"
        assert task_result(client.get(one_arg)) == 49
        # An object a task cannot carry as JSON is refused on the client.
        with pytest.raises(TypeError, match="JSON"):
            tasks.put({1, 2})
        # With no task held, a result queue put is a plain queue item.
        results.put("plain")
        assert (results.qsize(), results.empty()) == (1, False)
        assert results.get(timeout=5) == "plain"
        with pytest.raises(queue.Empty):
            results.get(timeout=0.2)


GRAB_ONE_TASK = """
import pathlib
import threading
from multiprocessing.managers import BaseManager


class QueueManager(BaseManager):
    pass


QueueManager.register("get_task_queue")
QueueManager.register("get_result_queue")
m = QueueManager(address=("127.0.0.1", {port}), authkey=b"abc")
m.connect()
task = m.get_task_queue()
result = m.get_result_queue()
print("took", task.get(), flush=True)
while not pathlib.Path("{release}").exists():
    threading.Event().wait(0.05)
result.put("late")
print("put late", flush=True)
"""


def grab_one_task(tmp_path: Path, port: int) -> tuple[ClassicProc, Path]:
    """A manager client that takes one task and holds it until the returned path exists."""
    release = tmp_path / f"release-{os.urandom(3).hex()}"
    script = tmp_path / f"grab-{os.urandom(3).hex()}.py"
    script.write_text(GRAB_ONE_TASK.format(port=port, release=release))
    grabber = ClassicProc(script)
    poll(lambda: "took" in grabber.output(), 20, "the client to take a task")
    return grabber, release


def test_a_client_that_disconnects_gives_its_task_back(
    tmp_path: Path, start_master: Callable[..., MasterProc]
) -> None:
    port = free_port()
    master = manager_master(start_master, port, extra=["--manager-lease-s", "120"])
    with master.client() as client:
        task_id = client.submit("square", [7])
        grabber, _ = grab_one_task(tmp_path, port)
        assert client.get(task_id).state == TaskState.RUNNING
        grabber.kill()  # kill -9: no goodbye, only the connection closing
        poll(lambda: client.get(task_id).state == TaskState.PENDING, 10, "the task to come back")


def test_a_client_silent_past_the_lease_loses_its_task(
    tmp_path: Path,
    start_master: Callable[..., MasterProc],
    start_worker: Callable[..., WorkerProc],
) -> None:
    port = free_port()
    master = manager_master(start_master, port, extra=["--manager-lease-s", "1"])
    with master.client() as client:
        task_id = client.submit("square", [7])
        grabber, release = grab_one_task(tmp_path, port)
        # The lease lapses while the client stays connected; a gRPC worker does the task.
        start_worker(master)
        assert next(iter(client.wait([task_id], timeout_s=20))).state == TaskState.SUCCEEDED
        # The client's late result is ignored: the first result wins.
        release.touch()
        assert grabber.wait() == 0
        assert "put late" in grabber.output()
        assert task_result(client.get(task_id)) == 49


# -- security ----------------------------------------------------------------------


def test_a_wrong_authkey_is_refused_without_disturbing_other_clients(
    start_master: Callable[..., MasterProc],
) -> None:
    secret = f"tf-secret-{os.urandom(4).hex()}"
    port = free_port()
    master = manager_master(start_master, port, authkey=secret)
    good: Any = connect(port, secret).get_result_queue()  # type: ignore[attr-defined]
    good.put("before")
    with pytest.raises(multiprocessing.AuthenticationError):
        connect(port, "wrong-key")
    # The connected client goes on as if nothing happened, and new ones get in.
    assert good.get(timeout=5) == "before"
    assert connect(port, secret).get_task_queue().qsize() == 0  # type: ignore[attr-defined]
    master.stop()
    assert secret not in master.output()


def test_a_manager_worker_with_a_wrong_authkey_stops_with_a_message(
    start_master: Callable[..., MasterProc], start_worker: Callable[..., WorkerProc]
) -> None:
    port = free_port()
    manager_master(start_master, port)
    worker = start_worker(
        f"127.0.0.1:{port}",
        extra=["--transport", "manager", "--authkey", "wrong", "--manager-task", "square"],
        wait_connected=False,
    )
    assert worker.wait() == 2
    assert "rejected --authkey" in worker.output()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}


MASTER_FLAGS = ["--store", "memory", "--manager-listen", "127.0.0.1:1"]
WORKER_FLAGS = ["--transport", "manager", "--tasks", "e2etasks"]


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["taskfleet.master", *MASTER_FLAGS, "--manager-task", "square"], "--authkey"),
        (["taskfleet.master", *MASTER_FLAGS, "--authkey", "key"], "--manager-task"),
        (["taskfleet.worker", *WORKER_FLAGS, "--manager-task", "square"], "--authkey"),
        (["taskfleet.worker", *WORKER_FLAGS, "--authkey", "key"], "--manager-task"),
    ],
)
def test_the_cli_refuses_missing_manager_flags(command: list[str], missing: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=TESTS_DIR,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert f"error: {missing}: required" in done.stderr
