"""The README's `make run-master` / `make run-worker` on an address of the
user's choosing: a real master and worker started through make."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from taskfleet.common.client import Client
from taskfleet.common.errors import TaskfleetError

from procs import TESTS_DIR, free_port, poll

ROOT = TESTS_DIR.parent


@contextmanager
def make(
    target: str, log: Path, *variables: str, env: dict[str, str] | None = None
) -> Iterator[None]:
    """``make target`` running in its own process group, stopped at the end."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", target, *variables],
            cwd=ROOT,
            env={**environment, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def workers(address: str) -> int | None:
    try:
        with Client(address) as client:
            return len(client.stats().workers) or None
    except TaskfleetError:
        return None


def test_run_master_and_run_worker_take_the_address_from_make_or_the_environment(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    store = f"TASKFLEET_STORE=sqlite:{tmp_path / 'tasks.db'}"
    with make("run-master", tmp_path / "master.log", f"MASTER={address}", store):
        # The worker finds the master on that port through the variable...
        with make("run-worker", tmp_path / "worker.log", f"MASTER={address}"):
            poll(lambda: workers(address), what="the worker started by make to connect")
        # ...and through TASKFLEET_MASTER in the environment.
        with make("run-worker", tmp_path / "worker2.log", env={"TASKFLEET_MASTER": address}):
            poll(lambda: workers(address), what="the second worker to connect")
            with Client(address) as client:
                assert client.run("square", [12], timeout_s=30) == 144
