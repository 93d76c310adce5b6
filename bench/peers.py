"""What the peers' sides of ``make bench-peers`` share; runs in .venv-peers' Python.

Celery, Dramatiq and RQ are no dependencies of taskfleet, so bench/run.py starts
bench/<peer>_side.py in the peers' venv once per round and reads the one JSON
object it prints on stdout. Each side is a ``PeerCluster``: a private Redis
server (broker and result store alike), the peer's workers started as its docs
start them, and the client in the side's own process; ``main`` times the same
workloads as run.py, with the same helpers (measuring.py), and stops every
server by pid before printing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import redis
from measuring import free_port, poll, trip_figures, with_cpu

BENCH = Path(__file__).resolve().parent
# How the tasks modules (<peer>_tasks.py) learn the Redis server: read on import.
REDIS_URL_ENV = "TASKFLEET_BENCH_REDIS_URL"
RESULT_TIMEOUT_S = 120  # per result: a lost task fails the round, not hangs the bench


def redis_url_from_env() -> str:
    """The URL of the round's Redis, for a tasks module: set before it is imported,
    in the client and in every worker."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(
            f"{REDIS_URL_ENV} must name the Redis server, e.g. redis://127.0.0.1:6379/0"
        )
    return url


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL to its process group: a killed parent would leave its
    pool children running. Each server is started in a session of its own, so the
    group is exactly that server and its children."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


class PeerCluster(ABC):
    """A Redis server plus a peer's workers; subclasses start the workers and run
    the workloads the way that peer's users do."""

    def __init__(self, workers: int) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="peer-bench-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        try:
            self.redis_url = self._start_redis()
            os.environ[REDIS_URL_ENV] = self.redis_url
            self.start_workers(workers)
            self.run_batch("noop", [()] * 200)  # warm up: pools started, code paths hot
        except BaseException:
            self.close()
            raise

    def _start_redis(self) -> str:
        """A private Redis: a free port, its own directory, nothing saved to disk."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("no redis-server on PATH; run `make peers-deps`")
        port = free_port()
        command = [
            exe,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self.tmp.name,
            "--daemonize", "no",
        ]  # fmt: skip
        self.redis = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(self.redis)
        client = redis.Redis(host="127.0.0.1", port=port)
        poll(lambda: _answers(client), "redis-server", proc=self.redis)
        self.redis_server_version = str(client.info("server")["redis_version"])
        client.close()
        return f"redis://127.0.0.1:{port}/0"

    def start_worker(self, *command: str) -> subprocess.Popen[bytes]:
        """One worker process, started in bench/ with the tasks modules importable;
        its banner goes to /dev/null so that stdout carries only the JSON, and
        warnings still reach stderr."""
        env = {**os.environ, "PYTHONPATH": str(BENCH)}
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=BENCH,
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.workers.append(proc)
        return proc

    def processes(self) -> dict[str, list[int]]:
        """Its processes by role, for CPU per task (measuring.cpu_seconds): Redis
        serves as the master does; whatever a worker starts counts as its pool."""
        return {"server": [self.redis.pid], "workers": [proc.pid for proc in self.workers]}

    @abstractmethod
    def start_workers(self, count: int) -> None:
        """Start the peer's workers (``count`` processes running tasks) and wait
        until they take tasks."""

    @abstractmethod
    def run_batch(self, task: str, args: list[tuple[int, ...]]) -> float:
        """Submit ``task`` once per item of ``args``, then wait for every result;
        returns the seconds taken."""

    @abstractmethod
    def round_trip(self, n: int) -> float:
        """Submit ``square(n)`` and wait for its result; returns the seconds taken."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """The peer's packages' versions, for the report."""

    def close(self) -> None:
        """The workers first (they would keep reconnecting to a stopped Redis), then Redis."""
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        self.tmp.cleanup()


def measure(cluster: PeerCluster, w1: int, w2: int, w3: int) -> dict[str, float]:
    """The figures run.py puts in its table, under the same names as its own."""
    procs = cluster.processes
    return {
        **with_cpu("w1", w1, procs, lambda: cluster.run_batch("noop", [()] * w1)),
        **with_cpu("w2", w2, procs, lambda: cluster.run_batch("square", [(n,) for n in range(w2)])),
        **trip_figures([cluster.round_trip(7) for _ in range(w3)]),
    }


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """run.py sends SIGTERM when a round overruns: exit through ``finally`` so the
    workers and Redis are stopped too, not left running."""
    sys.exit(128 + signum)


def main(make_cluster: Callable[[int], PeerCluster], doc: str | None) -> None:
    """A side's command line: one round, its figures and versions as JSON on stdout."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--w1", type=int, default=20_000)
    parser.add_argument("--w2", type=int, default=2_000)
    parser.add_argument("--w3", type=int, default=500, help="round trips")
    parser.add_argument("--workers", type=int, default=2, help="processes running tasks")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cluster = make_cluster(args.workers)
    try:
        figures = measure(cluster, args.w1, args.w2, args.w3)
        versions = {
            **cluster.versions(),
            "redis_py": redis.__version__,
            "redis_server": cluster.redis_server_version,
        }
    finally:
        cluster.close()
    print(json.dumps({**figures, "versions": versions}))
