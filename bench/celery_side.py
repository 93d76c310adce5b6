"""The Celery + Redis side of ``make bench-peers``; runs in .venv-peers' Python.

Celery is no dependency of taskfleet, so bench/run.py starts this script in its own
venv once per round and reads the one JSON object it prints on stdout. Here, as a
Celery user would run it: a Redis server (broker and result backend) and one Celery
worker, then the same workloads as run.py timed from a client in this process.
Both servers are stopped by pid before the figures are printed.

    .venv-peers/bin/python bench/celery_side.py --w1 20000 --w2 2000 --w3 500
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
import time
from pathlib import Path
from types import FrameType
from typing import Any

import celery
import kombu
import redis
from celery import Task
from measuring import free_port, poll, trip_figures

BENCH = Path(__file__).resolve().parent
REDIS_URL_ENV = "TASKFLEET_BENCH_REDIS_URL"  # as in celery_tasks.py, read before importing it
RESULT_TIMEOUT_S = 120  # per result: a lost task fails the round, not hangs the bench


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL to its process group: a killed prefork parent would
    leave its pool children running. Each server is started in a session of its own,
    so the group is exactly that server and its children."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class CeleryCluster:
    """A Redis server plus one Celery worker with a prefork pool of ``concurrency``."""

    def __init__(self, concurrency: int = 2) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="celery-bench-")
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.redis_url = self._start_redis()
            os.environ[REDIS_URL_ENV] = self.redis_url
            import celery_tasks  # only now: it reads the URL on import

            self.tasks = celery_tasks
            self._start_worker(concurrency)
            self.run_batch(self.tasks.noop, [()] * 200)  # warm up: pool forked, code paths hot
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
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        client = redis.Redis(host="127.0.0.1", port=port)
        poll(lambda: _answers(client), "redis-server", proc=proc)
        self.redis_server_version = str(client.info("server")["redis_version"])
        client.close()
        return f"redis://127.0.0.1:{port}/0"

    def _start_worker(self, concurrency: int) -> None:
        """One worker as the Celery docs start one, waited for until it answers a ping.

        Chosen: the default prefork pool with ``-c 2`` (the default, one process
        per CPU, on this 2-core machine, and as many processes as classic's two
        workers), and gossip, mingle and event heartbeats off, as the docs advise
        for a worker that needs no cluster events: they are broker traffic
        unrelated to running tasks. The startup banner goes to /dev/null so that
        stdout carries only the JSON; warnings still reach stderr.
        """
        command = [
            sys.executable, "-m", "celery", "-A", "celery_tasks", "worker",
            "-P", "prefork", "-c", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(BENCH)}
        proc = subprocess.Popen(
            command, cwd=BENCH, env=env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self.procs.append(proc)
        control = self.tasks.app.control
        poll(lambda: bool(control.ping(timeout=0.5)), "celery worker", proc=proc)

    def run_batch(self, task: Task, args: list[tuple[Any, ...]]) -> float:
        """Submit every task and wait for every result; returns seconds taken.

        The plainest way a Celery user runs many tasks and needs all their
        results: delay() in a loop, then AsyncResult.get() on each. On the Redis
        backend get() waits on pub/sub, and results that arrive for other tasks
        meanwhile are kept, so the later get()s mostly return at once. A group
        (apply_async, then GroupResult.get) was tried too and ran about a quarter
        slower here, so it would understate Celery.
        """
        start = time.perf_counter()
        pending = [task.delay(*a) for a in args]
        values = [result.get(timeout=RESULT_TIMEOUT_S) for result in pending]
        elapsed = time.perf_counter() - start
        assert len(values) == len(args), f"only {len(values)} of {len(args)} results"
        return elapsed

    def round_trip(self, n: int) -> float:
        """One task at a time, the plain way: delay(), then AsyncResult.get()."""
        start = time.perf_counter()
        value = self.tasks.square.delay(n).get(timeout=RESULT_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        assert value == n * n
        return elapsed

    def close(self) -> None:
        """The worker first (it would keep reconnecting to a stopped Redis), then Redis."""
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        self.tmp.cleanup()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def measure(cluster: CeleryCluster, w1: int, w2: int, w3: int) -> dict[str, float]:
    """The figures run.py puts in its table, under the same names as its own."""
    tasks = cluster.tasks
    figures = {
        "w1": w1 / cluster.run_batch(tasks.noop, [()] * w1),
        "w2": w2 / cluster.run_batch(tasks.square, [(n,) for n in range(w2)]),
    }
    trips = [cluster.round_trip(7) for _ in range(w3)]
    return {**figures, **trip_figures(trips)}


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """run.py sends SIGTERM when a round overruns: exit through ``finally`` so the
    worker and Redis are stopped too, not left running."""
    sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--w1", type=int, default=20_000)
    parser.add_argument("--w2", type=int, default=2_000)
    parser.add_argument("--w3", type=int, default=500, help="round trips")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cluster = CeleryCluster(args.concurrency)
    try:
        figures = measure(cluster, args.w1, args.w2, args.w3)
    finally:
        cluster.close()
    versions = {
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "redis_server": cluster.redis_server_version,
    }
    print(json.dumps({**figures, "versions": versions}))


if __name__ == "__main__":
    main()
