"""The Node.js example (examples/node) run against a live master and worker:
another language talks to taskfleet through nothing but the .proto files.

Its npm packages are installed into a temporary copy of the example, so the
repository stays clean; the tests skip only when node or npm is missing (and fail then in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from taskfleet.common.model import TaskState

from procs import MasterProc, WorkerProc
from system import missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPM_INSTALL_TIMEOUT_S = 240.0
NODE_TIMEOUT_S = 30.0

# The first test also pays for `npm install`.
pytestmark = pytest.mark.timeout(NPM_INSTALL_TIMEOUT_S + 60)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/node with its npm packages installed."""
    if NODE is None or NPM is None:
        missing("node and npm are needed to run examples/node (make system-deps)")
    assert NPM is not None
    folder = tmp_path_factory.mktemp("node") / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("node_modules"))
    env = {**os.environ, "npm_config_update_notifier": "false"}
    proc = subprocess.run(
        [NPM, "install", "--no-audit", "--no-fund"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=NPM_INSTALL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"npm install failed:\n{proc.stdout}\n{proc.stderr}"
    return folder


def run_example(
    example: Path, master: str, *numbers: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, "index.js", *map(str, numbers)],
        cwd=example,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")},
            # The copy lives outside the repository, so point it at the protos.
            "TASKFLEET_PROTOS": str(ROOT / "protos"),
            "TASKFLEET_MASTER": master,
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )


def test_node_submits_squares_and_prints_their_results(
    example: Path,
    master: MasterProc,
    start_worker: Callable[..., WorkerProc],
    queue_name: str,
) -> None:
    # Given a master and a Python worker serving `square` on a queue of its own
    start_worker(master, queues=queue_name)

    # when the Node.js service submits three tasks and waits for them
    proc = run_example(example, master.address, 3, 4, 12, env={"TASKFLEET_QUEUE": queue_name})

    # then it prints each result, in order, and exits 0
    assert proc.returncode == 0, proc
    assert proc.stdout.splitlines() == ["square(3) = 9", "square(4) = 16", "square(12) = 144"]
    assert proc.stderr == ""
    # and the tasks went through the master like any other
    with master.client() as client:
        (queue,) = [q for q in client.stats().queues if q.queue == queue_name]
    assert queue.counts.get(TaskState.SUCCEEDED) == 3


def test_node_reports_tasks_that_do_not_finish(
    example: Path, master: MasterProc, queue_name: str
) -> None:
    # Given no worker serves the queue, when the service waits one second
    proc = run_example(
        example, master.address, 5, env={"TASKFLEET_QUEUE": queue_name, "TASKFLEET_WAIT_S": "1"}
    )

    # then it says which task did not finish and exits 1
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert "square(5)" in proc.stderr
    assert "not finished" in proc.stderr
