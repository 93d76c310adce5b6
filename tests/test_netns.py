"""Many hosts: a master and two workers in three network namespaces the test
makes, joined by veth links to a bridge in the master's namespace.

    tf-<pid>-<tag>-m   br0 10.201.0.1/24, the master listens there
    tf-<pid>-<tag>-a   eth0 10.201.0.2/24, worker A
    tf-<pid>-<tag>-b   eth0 10.201.0.3/24, worker B

The private /24 exists only inside these namespaces, so no traffic leaves them.
The test process talks to the master from a helper process that has joined
the master's namespace (setns), and cuts worker A off by taking its link down
inside A's namespace. Everything is deleted at teardown. Where namespaces
cannot be made (not root, no ``ip``, not permitted) the test skips and says why.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from taskfleet.common.client import Client, make_spec, task_result
from taskfleet.common.errors import TaskfleetError
from taskfleet.common.model import Stats, Task, TaskSpec, TaskState, WorkerInfo

from procs import Proc, poll
from system import missing

WAIT_S = 30.0
LEASE_S = 2.0
HEARTBEAT_S = 0.5
SUBNET = "10.201.0"
PORT = 7070
MASTER_ADDRESS = f"{SUBNET}.1:{PORT}"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


# -- namespaces -------------------------------------------------------------------------


def ip(*args: str) -> None:
    """Run ``ip ARGS``; fails naming the command and what it said."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


class Hosts:
    """Three namespaces on one bridge: ``m`` (master), ``a`` and ``b`` (workers)."""

    def __init__(self) -> None:
        prefix = f"tf-{os.getpid()}-{secrets.token_hex(2)}"
        self.ns = {host: f"{prefix}-{host}" for host in ("m", "a", "b")}
        self.made: list[str] = []

    def create(self) -> None:
        """Make the namespaces (skipping the test if that is not possible), then link them."""
        if shutil.which("ip") is None:
            missing("no `ip` command: install iproute2 (make system-deps)")
        if os.geteuid() != 0:
            missing("making network namespaces needs root")
        _delete_leftovers()
        for ns in self.ns.values():
            done = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if done.returncode != 0:
                missing(f"cannot make a network namespace: {done.stderr.strip()}")
            self.made.append(ns)
            ip("-n", ns, "link", "set", "dev", "lo", "up")
        m = self.ns["m"]
        ip("-n", m, "link", "add", "name", "br0", "type", "bridge")
        ip("-n", m, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        ip("-n", m, "link", "set", "dev", "br0", "up")
        for number, host in ((2, "a"), (3, "b")):
            # Both ends are made inside m and one is moved: no name ever
            # appears in the namespace the test runs in.
            port, ns = f"to-{host}", self.ns[host]
            ip("-n", m, "link", "add", "name", port, "type", "veth", "peer", "name", "eth0")
            ip("-n", m, "link", "set", "dev", "eth0", "netns", ns)
            ip("-n", m, "link", "set", "dev", port, "master", "br0")
            ip("-n", m, "link", "set", "dev", port, "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "dev", "eth0", "up")

    def link(self, host: str, state: str) -> None:
        """Take ``host``'s only link ``down`` or bring it ``up``, from inside its namespace."""
        ip("-n", self.ns[host], "link", "set", "dev", "eth0", state)

    def delete(self) -> None:
        """Delete every namespace made; their links go with them."""
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def start(self, host: str, module: str, args: Sequence[str], log_dir: Path) -> Proc:
        """``python -m module args`` inside ``host``'s namespace (``ip netns exec``
        execs it, so the pid is the Python process's own)."""
        command = ["ip", "netns", "exec", self.ns[host], sys.executable, "-m", module, *args]
        return Proc(command, log_dir / f"{host}-{module.rpartition('.')[2]}.log")


def _delete_leftovers() -> None:
    """Delete the namespaces of earlier runs whose test process died before its teardown."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        tf, pid, *_ = [*name.split("-"), "", ""]
        if tf == "tf" and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


# -- a client inside the master's namespace ----------------------------------------------


def _enter_netns(ns: str) -> None:
    """Initializer of the helper process: join ``ns`` before any socket or thread exists."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns({ns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


_CLIENTS: dict[str, Client] = {}


def _client(address: str) -> Client:
    if address not in _CLIENTS:
        _CLIENTS[address] = Client(address)
    return _CLIENTS[address]


def _stats(address: str) -> Stats:
    return _client(address).stats()


def _submit(address: str, specs: list[TaskSpec]) -> list[str]:
    return _client(address).submit_many(specs)


def _get(address: str, task_ids: list[str]) -> list[Task]:
    client = _client(address)
    return [client.get(i) for i in task_ids]


def _wait(address: str, task_ids: list[str], timeout_s: float) -> list[Task]:
    return list(_client(address).wait(task_ids, timeout_s))


class NsClient:
    """The master's client API, run by a helper process inside the master's namespace."""

    def __init__(self, ns: str, address: str) -> None:
        self.address = address
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_enter_netns,
            initargs=(ns,),
        )

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(func, self.address, *args).result(timeout=2 * WAIT_S)

    def stats(self) -> Stats:
        return self._call(_stats)

    def submit(self, specs: list[TaskSpec]) -> list[str]:
        return self._call(_submit, specs)

    def get(self, task_ids: list[str]) -> list[Task]:
        return self._call(_get, task_ids)

    def wait(self, task_ids: list[str], timeout_s: float) -> dict[str, Task]:
        return {t.id: t for t in self._call(_wait, task_ids, timeout_s)}

    def serving(self) -> bool:
        try:
            self.stats()
        except TaskfleetError:
            return False
        return True

    def worker(self, pid: int) -> WorkerInfo | None:
        """The worker with ``pid`` as the master lists it now, or None."""
        try:
            workers = self.stats().workers
        except TaskfleetError:
            return None
        return next((w for w in workers if w.pid == pid), None)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    made = Hosts()
    try:
        made.create()
        yield made
    finally:
        made.delete()


@pytest.fixture
def ns_procs() -> Iterator[list[Proc]]:
    """Processes started in the namespaces, killed by pid before the namespaces go."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        if proc.popen.poll() is None:
            proc.kill()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[list[Path]]:
    """Files ``block_until`` tasks wait for (the namespaces share the file system);
    all opened at teardown."""
    made: list[Path] = []
    yield made
    for gate in made:
        gate.touch()


def started_by(gate: Path, attempt: int) -> int | None:
    """The pid that started ``attempt`` of the task waiting for ``gate``, if one did."""
    marker = Path(f"{gate}.started-{attempt}")
    text = marker.read_text() if marker.exists() else ""
    return int(text) if text else None


# -- the story --------------------------------------------------------------------------


def test_worker_cut_off_by_its_link_going_down_loses_its_tasks_and_comes_back(
    hosts: Hosts, ns_procs: list[Proc], gates: list[Path], tmp_path: Path, queue_name: str
) -> None:
    # Given a master in namespace m, serving on the bridge's address
    master = hosts.start(
        "m",
        "taskfleet.master",
        [
            *("--listen", MASTER_ADDRESS, "--insecure", "--store", "memory"),
            *("--lease-s", str(LEASE_S), "--heartbeat-s", str(HEARTBEAT_S), "--grace-s", "5"),
        ],
        tmp_path,
    )
    ns_procs.append(master)
    client = NsClient(hosts.ns["m"], MASTER_ADDRESS)
    try:
        poll(client.serving, WAIT_S, "the master to serve in its namespace")

        def worker(host: str, queues: str) -> tuple[Proc, str]:
            proc = hosts.start(
                host,
                "taskfleet.worker",
                [
                    *("--master", MASTER_ADDRESS, "--tasks", "e2etasks", "--queues", queues),
                    *("--pool", "thread", "--concurrency", "2", "--prefetch", "0"),
                ],
                tmp_path,
            )
            ns_procs.append(proc)
            info = poll(lambda: client.worker(proc.pid), WAIT_S, f"worker {host} to connect")
            return proc, info.worker_id

        # ...and worker A in namespace a, serving the shared queue and one of its
        # own, running two tasks of the shared queue that block on gates
        own_queue = f"{queue_name}-a"
        worker_a, a_id = worker("a", f"{queue_name},{own_queue}")
        first_gates = [tmp_path / "first-1", tmp_path / "first-2"]
        gates += first_gates
        first = client.submit(
            [make_spec("block_until", [str(g)], queue=queue_name) for g in first_gates]
        )
        poll(
            lambda: all(started_by(g, 1) == worker_a.pid for g in first_gates),
            WAIT_S,
            "both tasks to start on A",
        )
        # ...and worker B in namespace b serving the shared queue, idle
        worker_b, b_id = worker("b", queue_name)

        # When A's link goes down in the middle of its tasks
        hosts.link("a", "down")
        cut_at = time.monotonic()

        # Then the tasks run again on B once A's leases lapse (a lease plus a heartbeat)
        poll(
            lambda: all(started_by(g, 2) == worker_b.pid for g in first_gates),
            WAIT_S,
            "the tasks to start again on B",
        )
        rerun_after_s = time.monotonic() - cut_at
        # ...and the master stops listing A, silent for a whole lease
        poll(lambda: client.serving() and not client.worker(worker_a.pid), WAIT_S, "A dropped")

        # When A's link comes back
        restored_at = time.time()
        hosts.link("a", "up")

        # Then A reconnects by itself: a new session, listed by the master
        def reconnected() -> WorkerInfo | None:
            info = client.worker(worker_a.pid)
            return info if info is not None and info.connected_at >= restored_at else None

        assert poll(reconnected, WAIT_S, "A to reconnect").worker_id == a_id
        reconnected_after_s = time.time() - restored_at

        # And once the gates open, B's attempts are what counts: A's late
        # results, from leases it lost, change nothing
        for gate in first_gates:
            gate.touch()
        done = client.wait(first, WAIT_S)
        assert [(done[t].state, done[t].attempts, done[t].worker_id) for t in first] == [
            (TaskState.SUCCEEDED, 2, b_id)
        ] * 2
        assert [task_result(done[t]) for t in first] == ["released"] * 2

        # When two more blocking tasks come on A's own queue (A's slots are free
        # only once its threads of the lost attempts returned, so their late
        # outcomes have been dealt with before A takes new work)
        second_gates = [tmp_path / f"second-{i}" for i in range(2)]
        gates += second_gates
        second = client.submit(
            [make_spec("block_until", [str(g)], queue=own_queue) for g in second_gates]
        )

        # Then A takes work again: both run on A...
        poll(
            lambda: all(started_by(g, 1) == worker_a.pid for g in second_gates),
            WAIT_S,
            "both tasks to start on A",
        )
        # ...as the master's stats show
        poll(
            lambda: (info := client.worker(worker_a.pid)) is not None and info.running == 2,
            WAIT_S,
            "stats to show two tasks running on A",
        )

        # And they finish there
        for gate in second_gates:
            gate.touch()
        done = client.wait(second, WAIT_S)
        assert [(done[t].state, done[t].worker_id) for t in second] == [
            (TaskState.SUCCEEDED, a_id)
        ] * 2
        # ...and the first tasks' final state never changed
        assert [(t.state, t.attempts, t.worker_id) for t in client.get(first)] == [
            (TaskState.SUCCEEDED, 2, b_id)
        ] * 2
        assert worker_a.popen.poll() is None and worker_b.popen.poll() is None
        print(
            f"re-run on B {rerun_after_s:.1f} s after the cut "
            f"(lease {LEASE_S} s, heartbeat {HEARTBEAT_S} s); "
            f"A back {reconnected_after_s:.1f} s after its link"
        )
    finally:
        client.close()
