"""examples/fastapi/service.py served by uvicorn, driven over HTTP, against a real
master and worker: the AsyncClient inside serves many requests at once."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from procs import TESTS_DIR, MasterProc, WorkerProc, free_port, poll

EXAMPLE_DIR = TESTS_DIR.parent / "examples" / "fastapi"


@pytest.fixture
def service(master: MasterProc, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service:app", "--app-dir", str(EXAMPLE_DIR),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={"TASKFLEET_MASTER": master.address, "PATH": "/usr/bin:/bin"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _answers(base, proc), what="the example service to serve")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _answers(base: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "the example service exited"
    try:
        urllib.request.urlopen(f"{base}/docs", timeout=1).close()
    except OSError:
        return False
    return True


def call(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_fastapi_example_runs_tasks_for_its_callers(
    service: str, master: MasterProc, start_worker: Callable[..., WorkerProc]
) -> None:
    start_worker(master, concurrency=4)
    assert call("POST", f"{service}/square/7") == (200, {"n": 7, "square": 49})

    # Fifty requests at once, each waiting for its task.
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda n: call("POST", f"{service}/square/{n}"), range(50)))
    assert answers == [(200, {"n": n, "square": n * n}) for n in range(50)]

    status, queued = call("POST", f"{service}/jobs?n=12")
    assert status == 202
    done = poll(
        lambda: (
            (j := call("GET", f"{service}/jobs/{queued['id']}")[1])["state"] == "SUCCEEDED" and j
        ),
        what="the queued job to finish",
    )
    assert done["result"] == 144
    assert call("GET", f"{service}/jobs/{'0' * 32}")[0] == 404
