"""The single-file worker: `make dist` builds dist/taskfleet-worker.pyz, which
runs a worker on a machine that has python3 and nothing else."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskfleet.common.client import Client
from taskfleet.common.errors import TaskfleetError

from procs import MasterProc, poll

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 60.0

# A user's tasks module, next to the .pyz on the target machine. It reports where
# its libraries came from, to show they are the ones the .pyz carries.
USER_TASKS = textwrap.dedent(
    """
    import os
    import sys

    import grpc
    import taskfleet.worker
    from taskfleet.worker import current_task, task


    @task
    def add(a, b):
        return {
            "sum": a + b,
            "attempt": current_task().attempt,
            "pid": os.getpid(),
            "executable": sys.executable,
            "grpc": grpc.__file__,
            "taskfleet": list(taskfleet.worker.__path__),
            "tasks_module": __file__,
        }
    """
)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/taskfleet-worker.pyz, built by `make dist` into a temporary folder
    (without reinstalling the venv, which is the one running these tests)."""
    dist = tmp_path_factory.mktemp("dist")
    stamp = Path(sys.prefix) / ".installed"
    build = subprocess.run(
        ["make", "-s", "-o", str(stamp), "dist", f"VENV={sys.prefix}", f"DIST={dist}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"make dist failed:\n{build.stdout}\n{build.stderr}"
    assert len(list(dist.glob("taskfleet-*.whl"))) == 1
    pyz = dist / "taskfleet-worker.pyz"
    # Its compiled dependencies fit one Python minor version, and its shebang says which.
    shebang = pyz.read_bytes().partition(b"\n")[0].decode()
    assert shebang == "#!/usr/bin/env python{}.{}".format(*sys.version_info[:2])
    return pyz


def base_python() -> str:
    """The interpreter this venv was made from: python3 without the project."""
    python = getattr(sys, "_base_executable", "") or sys.executable
    probe = subprocess.run(
        [python, "-c", "import grpc"], env=clean_env(Path("/")), capture_output=True, check=False
    )
    if probe.returncode == 0:
        pytest.skip(f"{python} has grpcio installed, so it cannot show the .pyz brings its own")
    return python


def clean_env(home: Path) -> dict[str, str]:
    """What a fresh machine has: no venv on PATH, no PYTHONPATH, no TASKFLEET_*."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


@pytest.fixture
def run_pyz(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start the .pyz from an empty folder with a clean environment; killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def run(python: str, pyz: Path, folder: Path, *args: str) -> subprocess.Popen[bytes]:
        env = clean_env(tmp_path / "home")
        env["SHIV_ROOT"] = str(tmp_path / "shiv")
        log = open(tmp_path / "pyz-worker.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [python, pyz.name, *args],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()  # the child holds its own copy
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_pyz_worker_runs_tasks_from_its_folder_with_only_python3(
    pyz: Path,
    tmp_path: Path,
    master: MasterProc,
    client: Client,
    queue_name: str,
    run_pyz: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # Given: an empty folder on "another machine" with the .pyz and a tasks module
    folder = tmp_path / "target"
    folder.mkdir()
    target_pyz = folder / pyz.name
    target_pyz.write_bytes(pyz.read_bytes())
    (folder / "usertasks.py").write_text(USER_TASKS)

    # When: it runs as a worker with a process pool, under a bare python3
    python = base_python()
    worker = run_pyz(
        python,
        target_pyz,
        folder,
        *("--master", master.address, "--tasks", "usertasks", "--queues", queue_name),
        *("--pool", "process", "--concurrency", "1", "--grace-s", "10"),
    )
    log = tmp_path / "pyz-worker.log"

    def connected() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"pyz worker exited early:\n{log.read_text(errors='replace')}")
        try:
            return any(w.pid == worker.pid for w in client.stats().workers)
        except TaskfleetError:
            return False

    poll(connected, WAIT_S, "the pyz worker to connect")
    task_id = client.submit("add", [2, 3], queue=queue_name)

    # Then: the task is done, in a pool process, with the libraries the .pyz
    # unpacked under SHIV_ROOT and the tasks module from the working directory
    result = client.result(task_id, timeout_s=WAIT_S)
    shiv_root = str(tmp_path / "shiv")
    assert result["sum"] == 5
    assert result["attempt"] == 1
    assert result["pid"] != worker.pid
    assert result["executable"] == python
    assert result["grpc"].startswith(shiv_root)
    assert all(path.startswith(shiv_root) for path in result["taskfleet"])
    assert result["tasks_module"] == str(folder / "usertasks.py")

    # And: SIGTERM drains it and it exits 0, as under systemd
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(WAIT_S) == 0, log.read_text(errors="replace")
