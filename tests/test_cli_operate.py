"""The operator's commands (``list``, ``retry``, ``purge``) as a user runs them:
the console script against a real master and worker."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable

import pytest

from taskfleet.common.client import Client
from taskfleet.common.model import TaskState

from procs import TESTS_DIR, MasterProc, WorkerProc
from test_cli import CLI_TIMEOUT_S, EXIT_USAGE, TASKFLEET, _env, ok, refused, run


@pytest.fixture
def cluster(
    start_master: Callable[..., MasterProc], start_worker: Callable[..., WorkerProc]
) -> tuple[MasterProc, str]:
    """A master, a worker on one queue, and that queue's name."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    master = start_master()
    start_worker(master, queues=queue)
    return master, queue


def finished(client: Client, queue: str, *calls: tuple[str, list[object]]) -> list[str]:
    ids = [client.submit(name, args, queue=queue) for name, args in calls]
    assert len(list(client.wait(ids, timeout_s=30))) == len(ids)
    return ids


def test_list_shows_tasks_newest_first_filtered(cluster: tuple[MasterProc, str]) -> None:
    master, queue = cluster
    client = master.client()
    bad1, good, bad2 = finished(
        client, queue, ("boom", ["one"]), ("square", [3]), ("boom", ["two"])
    )

    table = ok(run("list", "--queue", queue, "--state", "failed", "--master", master.address))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "NAME", "QUEUE"]
    assert [line.split()[0] for line in lines[1:]] == [bad2, bad1]
    assert "RuntimeError: two" in lines[1]

    listed = run("list", "--queue", queue, "--limit", "2", "--json", "--master", master.address)
    assert (listed.returncode, listed.stderr) == (0, "")  # its tracebacks are the tasks'
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["state"]) for r in rows] == [(bad2, "FAILED"), (good, "SUCCEEDED")]

    by_env = ok(
        run(
            "list",
            "--state",
            "succeeded",
            "--master",
            master.address,
            env={"TASKFLEET_QUEUE": queue},
        )
    )
    assert [line.split()[0] for line in by_env.splitlines()[1:]] == [good]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--state", "failed,bogus"], "--state"),
        (["--limit", "0"], "--limit"),
        (["--limit", "lots"], "--limit"),
    ],
)
def test_list_refuses_bad_flags_in_one_line(
    cluster: tuple[MasterProc, str], args: list[str], flag: str
) -> None:
    master, _ = cluster
    refused(run("list", *args, "--master", master.address), flag, code=EXIT_USAGE)


def test_retry_reruns_failed_tasks_and_names_the_ones_it_cannot(
    cluster: tuple[MasterProc, str],
) -> None:
    master, queue = cluster
    client = master.client()
    bad, good = finished(client, queue, ("boom", ["x"]), ("square", [2]))

    proc = run("retry", bad, good, "no-such-task", "--master", master.address)

    assert proc.returncode == EXIT_USAGE
    assert proc.stdout.split() == [bad]
    refused(proc, good, "SUCCEEDED")
    refused(proc, "no-such-task", "not found")
    (again,) = client.wait([bad], timeout_s=30)
    assert (again.state, again.attempts) == (TaskState.FAILED, 2)


def test_purge_with_yes_deletes_and_without_a_terminal_asks_for_yes(
    cluster: tuple[MasterProc, str],
) -> None:
    master, queue = cluster
    client = master.client()
    bad, good = finished(client, queue, ("boom", ["x"]), ("square", [2]))
    addr = master.address

    refused(run("purge", "--queue", queue, "--master", addr), "--yes", code=EXIT_USAGE)
    refused(
        run("purge", "--state", "pending", "--yes", "--master", master.address),
        "--state",
        "PENDING",
        code=EXIT_USAGE,
    )
    assert client.get(bad).state is TaskState.FAILED

    out = ok(
        run("purge", "--queue", queue, "--state", "failed", "--yes", "--master", master.address)
    )

    assert out.strip() == "deleted 1 tasks"
    assert [t.id for t in client.list_tasks(queue=queue)] == [good]


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("n\n", False)])
def test_purge_on_a_terminal_shows_the_count_and_asks(
    cluster: tuple[MasterProc, str], answer: str, deleted: bool
) -> None:
    master, queue = cluster
    client = master.client()
    finished(client, queue, ("boom", ["x"]), ("boom", ["y"]), ("square", [2]))

    screen, code = _on_terminal(["purge", "--queue", queue, "--state", "failed"], master, answer)

    assert f"Delete 2 FAILED tasks of queue {queue}? [y/N]" in screen
    remaining = {t.state for t in client.list_tasks(queue=queue)}
    if deleted:
        assert code == 0 and "deleted 2 tasks" in screen
        assert remaining == {TaskState.SUCCEEDED}
    else:
        assert code == 1 and "nothing deleted" in screen
        assert remaining == {TaskState.SUCCEEDED, TaskState.FAILED}


def _on_terminal(args: list[str], master: MasterProc, answer: str) -> tuple[str, int]:
    """Run the console script with stdin, stdout and stderr on a pseudo-terminal,
    typing ``answer``; returns what it wrote and its exit status."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [TASKFLEET, *args, "--master", master.address],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_env(),
        cwd=TESTS_DIR,
    )
    os.close(follower)
    os.write(leader, answer.encode())
    try:
        code = proc.wait(timeout=CLI_TIMEOUT_S)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer has gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), code
