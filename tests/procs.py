"""Real master and worker processes for tests: free loopback ports, stopped by pid."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from taskfleet.common.channel import open_channel
from taskfleet.common.client import Client
from taskfleet.common.errors import TaskfleetError
from taskfleet.common.tls import client_tls
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

TESTS_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts_connections(port: int) -> bool:
    """Whether something listens on ``port`` of 127.0.0.1."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def poll(check: Callable[[], T | None], timeout_s: float = 30.0, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process whose output goes to a log file, stopped by pid."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait() or kill()
        self._awaited = False  # a test stopped it, or waits for its exit
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=_env(), cwd=TESTS_DIR
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def freeze(self) -> None:
        """SIGSTOP, returning once every thread has stopped. The signal is sent at
        once but, on a loaded machine, taken a while later (a test saw the
        process still running and reading its sockets after kill returned)."""
        self.signal(signal.SIGSTOP)
        poll(self._frozen, 30.0, f"pid {self.pid} to stop")

    def _frozen(self) -> bool:
        for thread in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue  # the thread has just exited
            if state != "T":
                return False
        return True

    def wait(self, timeout_s: float = 30.0) -> int:
        self._awaited = True
        try:
            return self.popen.wait(timeout_s)
        finally:
            if self.popen.returncode is not None:
                self._log.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait()

    def kill(self) -> None:
        self._awaited = True
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def exited_unasked(self) -> str:
        """If the process has exited though no one stopped or waited for it, what it
        printed (its exit code and the end of its log); else ""."""
        if self._awaited or self.popen.poll() is None:
            return ""
        tail = self.output()[-3000:]
        return f"{shlex.join(self.args[:3])} exited by itself with {self.popen.returncode}:\n{tail}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class MasterProc(Proc):
    def __init__(
        self,
        log_dir: Path,
        store: str = "memory",
        port: int | None = None,
        lease_s: float = 2.0,
        heartbeat_s: float = 0.5,
        extra: list[str] | None = None,
        client_auth: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        # Client keyword args (token, tls_ca, tls_cert, tls_key) that this master accepts.
        self.client_auth = client_auth or {}
        self.address = f"127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "taskfleet.master",
            "--listen",
            self.address,
            "--store",
            store,
            "--lease-s",
            str(lease_s),
            "--heartbeat-s",
            str(heartbeat_s),
            "--grace-s",
            "5",
            *(extra or []),
        ]
        super().__init__(args, log_dir / f"master-{self.port}.log")
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                self.wait()  # closes its log
                raise AssertionError(f"master exited early:\n{self.output()}")
            # gRPC waits out a reconnect backoff (about a second) after a refused
            # connect: dial only once the port takes connections.
            if not accepts_connections(self.port):
                return False
            # One quick call per poll: the client's own retries would only add delay.
            channel = open_channel(
                self.address,
                self.client_auth.get("token", ""),
                tls=client_tls(
                    self.client_auth.get("tls_ca", ""),
                    self.client_auth.get("tls_cert", ""),
                    self.client_auth.get("tls_key", ""),
                ),
            )
            try:
                stub = tasks_pb2_grpc.TaskServiceStub(channel)
                stub.GetStats(tasks_pb2.GetStatsRequest(), timeout=1, wait_for_ready=True)
            except grpc.RpcError:
                return False
            finally:
                channel.close()
            return True

        poll(ready, timeout_s, "master to serve")

    def client(self) -> Client:
        return Client(self.address, **self.client_auth)


class WorkerProc(Proc):
    def __init__(
        self,
        log_dir: Path,
        master: str,
        tasks: str = "e2etasks",
        queues: str = "default",
        pool: str = "thread",
        concurrency: int = 2,
        extra: list[str] | None = None,
        wait_connected: bool = True,
        client_auth: dict[str, str] | None = None,
    ) -> None:
        args = [
            sys.executable,
            "-m",
            "taskfleet.worker",
            "--master",
            master,
            "--tasks",
            tasks,
            "--queues",
            queues,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--grace-s",
            "10",
            *(extra or []),
        ]
        super().__init__(args, log_dir / f"worker-{time.monotonic_ns()}.log")
        self.master = master
        # How wait_connected asks the master for its workers (Client keyword args).
        self.client_auth = client_auth or {}
        if wait_connected:
            self.wait_connected()

    def wait_connected(self, timeout_s: float = 30.0) -> None:
        def connected() -> bool:
            if self.popen.poll() is not None:
                self.wait()  # closes its log
                raise AssertionError(f"worker exited early:\n{self.output()}")
            try:
                with Client(self.master, **self.client_auth) as client:
                    return any(w.pid == self.pid for w in client.stats().workers)
            except TaskfleetError:
                return False

        poll(connected, timeout_s, f"worker {self.pid} to connect")


class Gates:
    """Files that ``block_until`` tasks wait for; all opened at teardown (see the
    ``gates`` fixture), so no task is left blocking once its test is over."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self._made: list[Path] = []

    def new(self, name: str) -> str:
        path = self.root / name
        self._made.append(path)
        return str(path)

    @staticmethod
    def started(gate: str, attempt: int) -> int | None:
        """The pid that ran ``attempt`` (``block_until`` writes it on start), or None."""
        marker = Path(f"{gate}.started-{attempt}")
        text = marker.read_text() if marker.exists() else ""
        return int(text) if text else None

    @staticmethod
    def open(*gates: str) -> None:
        for gate in gates:
            Path(gate).touch()

    def open_all(self) -> None:
        self.open(*map(str, self._made))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
