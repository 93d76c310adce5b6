"""A damaged SQLite store file, found at start (the master refuses to start with
one line naming the file and what to do) or while the master runs (calls fail
with StoreUnusable naming the file, health turns NOT_SERVING, one log line).
The damage is real: pages in the middle of a file the master wrote are
overwritten on disk."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskfleet.common.client import make_spec
from taskfleet.common.errors import StoreUnusable
from taskfleet.master.store.sqlite_damage import FULL_CHECK_MAX_BYTES

from procs import MasterProc, Proc, free_port, poll

WAIT_S = 60.0


def fill(master: MasterProc, n_tasks: int, payload_chars: int) -> list[str]:
    """Submit ``n_tasks`` tasks, in batches; their ids in order (and so in the file)."""
    per_batch = max(1, min(1000, 4_000_000 // payload_chars))
    task_ids: list[str] = []
    with master.client() as client:
        for start in range(0, n_tasks, per_batch):
            count = min(per_batch, n_tasks - start)
            specs = [make_spec("square", ["y" * payload_chars]) for _ in range(count)]
            task_ids += client.submit_many(specs)
    return task_ids


def stopped(master: MasterProc) -> None:
    """Stop ``master`` cleanly: its WAL is folded into the file and removed."""
    assert master.stop() == 0, master.output()
    assert not Path(
        master.args[master.args.index("--store") + 1].removeprefix("sqlite:") + "-wal"
    ).exists()


def page_size(path: Path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def overwrite_pages(path: Path, first_page: int, n_pages: int) -> None:
    """Put random bytes over pages ``first_page``.. (1-based, as SQLite counts)."""
    size = page_size(path)
    noise = random.Random(first_page).randbytes(size * n_pages)
    with open(path, "r+b") as f:
        f.seek((first_page - 1) * size)
        f.write(noise)
        f.flush()
        os.fsync(f.fileno())


def damage_middle(path: Path) -> None:
    """Overwrite the middle fifth of the file: table and index pages of the tasks there."""
    n_pages = path.stat().st_size // page_size(path)
    overwrite_pages(path, first_page=n_pages * 2 // 5, n_pages=n_pages // 5)


def start_expecting_refusal(tmp_path: Path, store: str) -> Proc:
    """A master on ``store`` that must exit rather than serve."""
    port = free_port()
    args = [sys.executable, "-m", "taskfleet.master", "--listen", f"127.0.0.1:{port}"]
    proc = Proc([*args, "--store", store], tmp_path / f"master-refused-{port}.log")
    poll(
        lambda: proc.popen.poll() is not None or "listening on" in proc.output(),
        WAIT_S,
        "the master to exit or serve",
    )
    if proc.popen.poll() is None:
        proc.kill()
        pytest.fail(f"the master started on a damaged file:\n{proc.output()}")
    proc.wait()
    return proc


def assert_refused_naming(proc: Proc, path: Path) -> None:
    assert proc.popen.returncode == 2, proc.output()
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(f"taskfleet master: error: store file {path} is damaged or unreadable (")
    assert f"restore {path} from a backup" in line
    assert f"sqlite3 {path} .recover | sqlite3 NEW.db" in line


def test_a_master_refuses_to_start_on_a_file_damaged_in_the_middle(
    tmp_path: Path, start_master: Callable[..., MasterProc]
) -> None:
    # Given a store file the master wrote 20,000 tasks to, then stopped
    path = tmp_path / "tasks.db"
    master = start_master(store=f"sqlite:{path}")
    fill(master, 20_000, payload_chars=900)
    stopped(master)

    # When pages in its middle are overwritten, and the master starts again
    damage_middle(path)
    proc = start_expecting_refusal(tmp_path, f"sqlite:{path}")

    # Then it exits at once with one line naming the file and what to do
    assert_refused_naming(proc, path)


def test_a_large_file_gets_the_cheap_check_of_what_the_master_reads_first(
    tmp_path: Path, start_master: Callable[..., MasterProc]
) -> None:
    # Given a store file larger than the whole-file check's limit, with tasks queued
    path = tmp_path / "tasks.db"
    master = start_master(store=f"sqlite:{path}")
    payload_chars = 900_000
    fill(master, FULL_CHECK_MAX_BYTES // payload_chars + 8, payload_chars)
    stopped(master)
    assert path.stat().st_size > FULL_CHECK_MAX_BYTES

    # When the root page of the index of ready tasks is overwritten
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'tasks_ready_by_queue'"
        ).fetchone()
    db.close()
    overwrite_pages(path, first_page=root, n_pages=1)
    proc = start_expecting_refusal(tmp_path, f"sqlite:{path}")

    # Then the master refuses to start, as for a small file
    assert_refused_naming(proc, path)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S
        )
    return int(reply.status)


def test_damage_found_while_running_makes_calls_fail_clearly_and_health_not_serving(
    tmp_path: Path, start_master: Callable[..., MasterProc]
) -> None:
    # Given a master serving a store file of 20,000 tasks, far more than SQLite's page cache
    path = tmp_path / "tasks.db"
    first = start_master(store=f"sqlite:{path}")
    task_ids = fill(first, 20_000, payload_chars=900)
    stopped(first)
    metrics_address = f"127.0.0.1:{free_port()}"
    master = start_master(store=f"sqlite:{path}", extra=["--metrics-listen", metrics_address])
    assert health_status(master.address) == health_pb2.HealthCheckResponse.SERVING

    # When pages in the middle of the file are overwritten under it
    damage_middle(path)

    # Then reading the tasks stored there fails, naming the file and what to do
    middle = task_ids[len(task_ids) * 2 // 5 : len(task_ids) * 3 // 5]
    with master.client() as client:
        with pytest.raises(StoreUnusable) as raised:
            for task_id in middle:
                client.get(task_id)
        message = str(raised.value)
        assert message.startswith(f"store file {path} is damaged or unreadable (")
        assert f"restore {path} from a backup" in message

        # And the store is not touched again: every call now fails the same way
        with pytest.raises(StoreUnusable):
            client.stats()

    # And health says NOT_SERVING, so load balancers stop sending calls
    assert health_status(master.address) == health_pb2.HealthCheckResponse.NOT_SERVING

    # And metrics are still served, without the queue depths it can no longer read
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=WAIT_S) as reply:
        scraped = reply.read().decode()
    assert "taskfleet_workers_connected 0.0" in scraped
    assert "taskfleet_queue_depth{" not in scraped

    # And the log says it once, without a traceback
    output = master.output()
    assert output.count("is damaged or unreadable") == 1, output
    assert "Traceback" not in output

    # And the master still stops cleanly
    master.signal(signal.SIGTERM)
    assert master.wait(WAIT_S) == 0, master.output()
