"""The ``taskfleet`` console script, run as a real subprocess against a real
master and worker on loopback.

One master and one thread-pool worker (serving ``taskfleet.worker.examples``)
are shared by the whole module, so each case costs one CLI start-up; cases that
must not be picked up use a queue no worker serves.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskfleet.common.client import make_spec

from procs import TESTS_DIR, MasterProc, WorkerProc, free_port, poll

TASKFLEET = str(Path(sys.executable).parent / "taskfleet")
EXAMPLES = "taskfleet.worker.examples"
CLI_TIMEOUT_S = 30.0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run(
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
    exe: list[str] | None = None,
    stdin: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run the console script (or ``exe``) to completion; never hangs the suite."""
    return subprocess.run(
        [*(exe or [TASKFLEET]), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(env),
        cwd=TESTS_DIR,
        timeout=timeout_s,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must have succeeded cleanly."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], *words: str, code: int | None = None) -> str:
    """The stderr line of a command that must have failed cleanly, naming ``words``."""
    out = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode != 0, out
    if code is not None:
        assert proc.returncode == code, out
    assert "Traceback" not in proc.stdout, out
    assert "Traceback" not in proc.stderr, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    matching = [line for line in lines if all(w in line for w in words)]
    assert matching, f"no stderr line names {words}\n{out}"
    return matching[0]


# -- one master and one worker for the module ---------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MasterProc, WorkerProc]]:
    log_dir = tmp_path_factory.mktemp("cli")
    started: list[MasterProc | WorkerProc] = []
    try:
        master = MasterProc(log_dir)
        started.append(master)
        worker = WorkerProc(log_dir, master.address, tasks=EXAMPLES, concurrency=4)
        started.append(worker)
        yield master, worker
    finally:
        for proc in reversed(started):
            if proc.popen.poll() is None:
                proc.kill()


@pytest.fixture
def addr(cluster: tuple[MasterProc, WorkerProc]) -> str:
    return cluster[0].address


@pytest.fixture
def idle_queue() -> str:
    """A queue no worker serves: tasks put there stay PENDING."""
    return f"idle-{uuid.uuid4().hex[:8]}"


def submit(addr: str, *args: str) -> str:
    task_id = ok(run("submit", *args, "--master", addr)).strip()
    assert task_id and " " not in task_id and "\n" not in task_id
    return task_id


def get_json(addr: str, task_id: str) -> dict[str, object]:
    task = json.loads(ok(run("get", task_id, "--json", "--master", addr)))
    assert isinstance(task, dict)
    return task


def wait_final(addr: str, task_id: str) -> dict[str, object]:
    """The task as JSON once it is final (via ``wait --json``; exit 1 if it failed)."""
    proc = run("wait", task_id, "--json", "--timeout-s", "20", "--master", addr)
    assert proc.returncode in (0, EXIT_TASK_FAILED), proc
    assert proc.stderr == "", proc
    task = json.loads(proc.stdout)
    assert task["id"] == task_id
    assert task["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
    return task


# -- golden paths ---------------------------------------------------------------


def test_submit_wait_prints_the_result(addr: str) -> None:
    assert ok(run("submit", "square", "7", "--wait", "--master", addr)) == "49\n"


def test_submit_prints_an_id_and_get_shows_the_outcome(addr: str) -> None:
    task_id = submit(addr, "square", "6")
    wait_final(addr, task_id)

    text = ok(run("get", task_id, "--master", addr))
    fields = dict(line.strip().split(": ", 1) for line in text.splitlines() if ": " in line)
    assert fields["id"] == task_id
    assert fields["name"] == "square"
    assert fields["state"] == "SUCCEEDED"
    assert fields["result"] == "36"

    # Times for people in the local zone (TZ set for the CLI), for scripts in UTC.
    local = ok(run("get", task_id, "--master", addr, env={"TZ": "Asia/Kolkata"}))
    local_fields = dict(line.strip().split(": ", 1) for line in local.splitlines() if ": " in line)
    created_here = dt.datetime.fromisoformat(local_fields["created_at"])
    assert created_here.utcoffset() == dt.timedelta(hours=5, minutes=30)

    task = get_json(addr, task_id)
    for key in ("id", "name", "queue", "state", "attempts", "result", "error", "worker_id"):
        assert key in task, key
    created = dt.datetime.fromisoformat(str(task["created_at"]))
    assert created.utcoffset() == dt.timedelta(0)
    assert created == created_here
    assert task["not_before"] is None
    assert task["id"] == task_id
    assert task["name"] == "square"
    assert task["queue"] == "default"
    assert task["state"] == "SUCCEEDED"
    assert task["attempts"] == 1
    assert task["result"] == 36
    assert task["error"] is None
    assert task["worker_id"]


def test_submit_json_prints_the_id_as_json(addr: str) -> None:
    out = ok(run("submit", "square", "2", "--json", "--master", addr))
    task_id = json.loads(out)["id"]
    assert wait_final(addr, task_id)["result"] == 4


def test_wait_prints_one_line_per_task_with_its_state(addr: str) -> None:
    good = submit(addr, "square", "3")
    bad = submit(addr, "fail", "nope")
    proc = run("wait", good, bad, "--timeout-s", "20", "--master", addr)
    assert proc.returncode == EXIT_TASK_FAILED, proc  # one of them FAILED
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {good, bad}
    assert lines[good].split()[1:] == ["SUCCEEDED", "9"]
    assert lines[bad].split()[1] == "FAILED"
    assert "RuntimeError: nope" in lines[bad]

    # All succeeded: exit 0.
    other = submit(addr, "square", "4")
    assert ok(run("wait", good, other, "--master", addr)).count("SUCCEEDED") == 2


def test_wait_timeout_on_a_pending_task(addr: str, idle_queue: str) -> None:
    task_id = submit(addr, "square", "1", "--queue", idle_queue)
    proc = run("wait", task_id, "--timeout-s", "0.3", "--master", addr)
    refused(proc, "timed out", task_id, code=EXIT_TASK_FAILED)


def test_cancel_a_pending_task(addr: str, idle_queue: str) -> None:
    task_id = submit(addr, "square", "5", "--queue", idle_queue)
    assert get_json(addr, task_id)["state"] == "PENDING"
    assert ok(run("cancel", task_id, "--master", addr)).split() == [task_id, "CANCELLED"]
    assert get_json(addr, task_id)["state"] == "CANCELLED"
    # Cancelling again is refused: the task is already final.
    refused(run("cancel", task_id, "--master", addr), task_id, "CANCELLED")


def test_stats_table_and_json(
    cluster: tuple[MasterProc, WorkerProc], addr: str, idle_queue: str
) -> None:
    worker = cluster[1]
    submit(addr, "square", "1", "--queue", idle_queue)

    text = ok(run("stats", "--master", addr))
    queues_table = text.split("\n\n")[0]  # the first table; more follow
    queue_rows = {line.split()[0]: line.split() for line in queues_table.splitlines()}
    assert queue_rows["QUEUE"][:2] == ["QUEUE", "PENDING"]
    assert queue_rows[idle_queue][1] == "1"  # one PENDING
    assert "\nWORKER " in text

    stats = json.loads(ok(run("stats", "--json", "--master", addr)))
    (w,) = [w for w in stats["workers"] if w["pid"] == worker.pid]
    assert w["worker_id"] in text  # the table shows the same worker
    assert w["queues"] == ["default"]
    assert w["concurrency"] == 4
    assert "square" in w["task_names"]
    (q,) = [q for q in stats["queues"] if q["queue"] == idle_queue]
    assert q["pending"] == 1


def test_kwargs_and_json_args(addr: str) -> None:
    assert ok(run("submit", "add", "1.5", "--kwarg", "b=2", "--wait", "--master", addr)) == "3.5\n"
    assert ok(run("submit", "add", "--kwarg", "a=1", "--kwarg", "b=2", "--wait", "--master", addr))
    # A bare word is a string argument; the JSON result is printed as JSON.
    out = ok(run("submit", "sleep", "0", "--wait", "--master", addr))
    assert out == "0\n"


def test_meta_priority_and_delay_pass_through(addr: str, idle_queue: str) -> None:
    # metadata reaches the running task (whoami echoes current_task())
    out = ok(
        run("submit", "whoami", "--meta", "team=ops", "--meta", "x=a=b", "--wait", "--master", addr)
    )
    ctx = json.loads(out)
    assert ctx["name"] == "whoami"
    assert ctx["metadata"] == {"team": "ops", "x": "a=b"}

    # priority and delay are stored on the task
    before = time.time()
    task_id = submit(
        addr,
        "square",
        "2",
        "--queue",
        idle_queue,
        "--priority",
        "7",
        "--delay-s",
        "600",
        "--max-attempts",
        "3",
        "--meta",
        "k=v",
    )
    task = get_json(addr, task_id)
    assert task["state"] == "PENDING"
    assert task["queue"] == idle_queue
    assert task["priority"] == 7
    assert task["max_attempts"] == 3
    assert task["metadata"] == {"k": "v"}
    not_before = dt.datetime.fromisoformat(str(task["not_before"])).timestamp()
    assert before + 590 < not_before < time.time() + 610


def test_delay_holds_a_task_back(addr: str) -> None:
    task_id = submit(addr, "square", "3", "--delay-s", "600")
    assert get_json(addr, task_id)["state"] == "PENDING"  # a worker serves this queue
    ok(run("cancel", task_id, "--master", addr))


def test_master_from_the_environment(addr: str) -> None:
    env = {"TASKFLEET_MASTER": addr}
    assert ok(run("submit", "square", "8", "--wait", env=env)) == "64\n"
    assert "WORKER" in ok(run("stats", env=env))
    # A flag wins over the environment.
    bad_env = {"TASKFLEET_MASTER": f"127.0.0.1:{free_port()}"}
    assert ok(run("submit", "square", "9", "--wait", "--master", addr, env=bad_env)) == "81\n"


def test_json_from_the_environment(addr: str) -> None:
    task_id = submit(addr, "square", "10")
    wait_final(addr, task_id)
    out = ok(run("get", task_id, "--master", addr, env={"TASKFLEET_JSON": "1"}))
    assert json.loads(out)["result"] == 100


def test_failed_task_under_wait(addr: str) -> None:
    proc = run("submit", "fail", "--wait", "--master", addr)
    assert proc.stdout == ""
    line = refused(proc, "FAILED", "RuntimeError", "failed on purpose", code=EXIT_TASK_FAILED)
    assert line.startswith("taskfleet")


def test_get_of_a_failed_task_shows_the_error(addr: str) -> None:
    task_id = submit(addr, "fail", "boom")
    assert wait_final(addr, task_id)["state"] == "FAILED"
    # ``get`` itself succeeds; the task's own traceback is data in the output.
    proc = run("get", task_id, "--json", "--master", addr)
    assert proc.returncode == 0, proc
    task = json.loads(proc.stdout)
    assert task["state"] == "FAILED"
    assert task["result"] is None
    assert task["error"]["type"] == "RuntimeError"
    assert task["error"]["message"] == "boom"
    assert "RuntimeError: boom" in task["error"]["traceback"]


# -- many tasks at once, and what a person at a terminal sees ----------------


def test_submit_from_stdin_prints_ids_then_results_in_input_order(addr: str) -> None:
    # Given one task per line: a bare value, an array of args, an args/kwargs
    # object, with a shared --kwarg
    lines = '1\n[2]\n\n{"args": [3], "kwargs": {"b": 100}}\n'

    # when submitted without --wait, one id per task comes back, in input order
    ids = ok(run("submit", "add", "--kwarg", "b=10", "--from-stdin", "--master", addr, stdin=lines))
    task_ids = ids.split()
    assert len(task_ids) == 3
    assert [wait_final(addr, t)["result"] for t in task_ids] == [11, 12, 103]

    # and with --wait, the results print in input order, whatever order they finish in
    many = "".join(f"{n}\n" for n in range(20))
    out = ok(run("submit", "square", "--from-stdin", "--wait", "--master", addr, stdin=many))
    assert out.split() == [str(n * n) for n in range(20)]


def test_submit_from_stdin_json_and_failures(addr: str) -> None:
    # --json prints one object per task; a failed task makes the exit status 1
    # and is reported on stderr, naming it
    proc = run(
        "submit", "fail", "--from-stdin", "--wait", "--json", "--master", addr, stdin='"a"\n"b"\n'
    )
    assert proc.returncode == EXIT_TASK_FAILED, proc
    tasks = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(t["error"]["message"] for t in tasks) == ["a", "b"]

    proc = run("submit", "fail", "--from-stdin", "--wait", "--master", addr, stdin='"a"\n"b"\n')
    assert proc.returncode == EXIT_TASK_FAILED, proc
    assert proc.stdout == ""
    assert len([line for line in proc.stderr.splitlines() if "FAILED" in line]) == 2


def test_submit_from_stdin_idempotency_key_per_line(addr: str, idle_queue: str) -> None:
    # Given a batch submitted with an idempotency key
    key = f"batch-{uuid.uuid4().hex[:8]}"
    args = ("submit", "square", "--from-stdin", "--idempotency-key", key, "--queue", idle_queue)
    first = ok(run(*args, "--master", addr, stdin="1\n2\n3\n")).split()
    # when the same batch is submitted again, the same tasks come back, one per line
    assert ok(run(*args, "--master", addr, stdin="1\n2\n3\n")).split() == first
    assert len(set(first)) == 3


def test_submit_from_stdin_empty_and_bad_lines(addr: str) -> None:
    assert ok(run("submit", "square", "--from-stdin", "--wait", "--master", addr)) == ""
    proc = run("submit", "square", "--from-stdin", "--master", addr, stdin="1\n[2\n")
    refused(proc, "--from-stdin", "line 2", code=EXIT_USAGE)
    proc = run("submit", "add", "--from-stdin", "--master", addr, stdin='{"args": 1}\n')
    refused(proc, "--from-stdin", "line 1", "args", code=EXIT_USAGE)


def test_submit_from_stdin_checks_every_line_before_creating_any(
    addr: str, idle_queue: str
) -> None:
    # Given 2,500 lines of which the last is over the master's default payload limit
    lines = "".join(f"{n}\n" for n in range(2_499)) + json.dumps("x" * (1024 * 1024)) + "\n"

    # when they are submitted, the command is refused naming that line
    proc = run("submit", "square", "--from-stdin", "--queue", idle_queue, "--master", addr,
               stdin=lines)  # fmt: skip
    refused(proc, "line 2500", "payload", "--max-payload-bytes", code=EXIT_USAGE)

    # and no task was created
    assert proc.stdout == ""
    stats = json.loads(ok(run("stats", "--json", "--master", addr)))
    assert idle_queue not in [q["queue"] for q in stats["queues"]]


def test_a_line_the_master_refuses_is_named_and_the_ids_before_it_are_printed(
    start_master: Callable[..., MasterProc], idle_queue: str
) -> None:
    # Given a master with a lower payload limit than the client knows, and 2,500
    # lines of which the last is over that limit
    master = start_master(extra=["--max-payload-bytes", "100"])
    lines = "".join(f"{n}\n" for n in range(2_499)) + json.dumps("x" * 200) + "\n"

    # when they are submitted
    proc = run("submit", "square", "--from-stdin", "--queue", idle_queue,
               "--master", master.address, stdin=lines)  # fmt: skip

    # then the error names the input line and says what was created
    line = refused(proc, "line 2500", "payload", code=EXIT_TASK_FAILED)
    assert "2000 task(s) were created" in line
    assert "tasks[" not in line
    # and the ids of the batches created before it were printed, and exist
    task_ids = proc.stdout.split()
    assert len(set(task_ids)) == 2_000
    stats = json.loads(ok(run("stats", "--json", "--master", master.address)))
    (q,) = [q for q in stats["queues"] if q["queue"] == idle_queue]
    assert q["pending"] == 2_000
    for task_id in (task_ids[0], task_ids[-1]):
        assert get_json(master.address, task_id)["queue"] == idle_queue


def test_submit_wait_prints_the_ids_on_stderr_as_they_are_created(addr: str) -> None:
    proc = run("submit", "square", "--from-stdin", "--wait", "--master", addr, stdin="3\n4\n")
    assert ok(proc) == "9\n16\n"  # stdout stays the results
    task_ids = [line.split()[-1] for line in proc.stderr.splitlines()]
    assert [line.split()[:-1] for line in proc.stderr.splitlines()] == [
        ["taskfleet:", "submitted"]
    ] * 2
    assert [get_json(addr, t)["result"] for t in task_ids] == [9, 16]


def test_wait_resumes_across_a_master_restart(
    start_master: Callable[..., MasterProc], tmp_path: Path, idle_queue: str
) -> None:
    # Given `taskfleet wait` on a final task and a pending one, the final one printed
    store = f"sqlite:{tmp_path / 'tasks.db'}"
    master = start_master(store=store)
    with master.client() as client:
        done, pending = client.submit_many(
            make_spec("square", [n], queue=idle_queue) for n in (1, 2)
        )
        client.cancel(done)
    wait = subprocess.Popen(
        [TASKFLEET, "wait", done, pending, "--timeout-s", "120", "--master", master.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=TESTS_DIR,
    )
    try:
        assert wait.stdout is not None
        first = read_line(wait.stdout.fileno())
        assert first.split()[:2] == [done, "CANCELLED"]

        # when the master restarts on the same port and store, and the task then ends
        assert master.stop() == 0
        restarted = start_master(store=store, port=master.port)
        with restarted.client() as client:
            client.cancel(pending)

        # then the same command reports it, and nothing timed out
        out, err = wait.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if wait.poll() is None:
            wait.kill()
            wait.wait()
    assert err.decode() == ""
    assert out.decode().split()[:2] == [pending, "CANCELLED"]
    assert wait.returncode == EXIT_TASK_FAILED  # cancelled tasks count as not succeeded


def read_line(fd: int, timeout_s: float = CLI_TIMEOUT_S) -> str:
    """One line from ``fd``, read byte by byte so nothing after it is consumed."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no line within {timeout_s} s (got {data!r})"
        byte = os.read(fd, 1)
        assert byte, f"EOF before a line (got {data!r})"
        data += byte
    return data.decode()


def test_wait_for_many_off_a_terminal_prints_only_plain_lines(addr: str) -> None:
    task_ids = ok(run("submit", "square", "--from-stdin", "--master", addr, stdin="1\n2\n3\n"))
    proc = run("wait", *task_ids.split(), "--timeout-s", "20", "--master", addr)
    assert ok(proc).count("SUCCEEDED") == 3
    assert proc.stderr == ""  # no progress bar in a pipe
    assert len(proc.stdout.splitlines()) == 3


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
TERMINAL_COLUMNS = 160


@dataclass
class TerminalRun:
    returncode: int
    screen: str  # everything written to the terminal, escape sequences removed
    stdout: str  # stdout when it was a pipe rather than the terminal


def run_on_terminal(
    *args: str, stdin: str = "", stdout_on_terminal: bool = True, timeout_s: float = CLI_TIMEOUT_S
) -> TerminalRun:
    """Run the console script with stderr (and stdout, unless told otherwise) on a
    pseudo-terminal, reading until both reach EOF or ``timeout_s`` passes."""
    leader, follower = os.openpty()
    # A wide terminal, so tables and bars are not wrapped.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, TERMINAL_COLUMNS, 0, 0))
    env = _env({"TERM": "xterm-256color", "COLUMNS": str(TERMINAL_COLUMNS)})
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [TASKFLEET, *args],
        stdin=subprocess.PIPE,
        stdout=follower if stdout_on_terminal else subprocess.PIPE,
        stderr=follower,
        env=env,
        cwd=TESTS_DIR,
    )
    os.close(follower)
    assert proc.stdin is not None
    proc.stdin.write(stdin.encode())
    proc.stdin.close()
    piped_fd = proc.stdout.fileno() if proc.stdout is not None else None
    chunks: dict[int, list[bytes]] = {leader: []}
    if piped_fd is not None:
        chunks[piped_fd] = []
    deadline = time.monotonic() + timeout_s
    try:
        open_fds = set(chunks)
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{args} still writing after {timeout_s} s")
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer has gone
                    data = b""
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.discard(fd)
        returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
        if proc.stdout is not None:
            proc.stdout.close()
    screen = ANSI.sub("", b"".join(chunks[leader]).decode(errors="replace"))
    piped = b"".join(chunks[piped_fd]) if piped_fd is not None else b""
    return TerminalRun(returncode, screen.replace("\r\n", "\n"), piped.decode())


def test_submit_wait_on_a_terminal_shows_a_progress_bar(addr: str) -> None:
    # Given twelve tasks submitted and waited for at a terminal
    many = "".join(f"{n}\n" for n in range(12))
    term = run_on_terminal(
        "submit", "square", "--from-stdin", "--wait", "--master", addr, stdin=many
    )

    # then the bar ends complete, with the tally, and the results are there too
    assert term.returncode == 0, term.screen
    assert "Traceback" not in term.screen
    assert "12/12" in term.screen, term.screen
    assert "12 succeeded" in term.screen, term.screen
    assert "━" in term.screen  # the bar itself
    lines = term.screen.splitlines()
    for n in range(12):
        assert str(n * n) in lines, (n, term.screen)


def test_wait_with_stdout_piped_keeps_results_off_the_terminal(addr: str) -> None:
    # Given tasks waited for with stderr on a terminal but stdout in a pipe
    task_ids = ok(run("submit", "square", "--from-stdin", "--master", addr, stdin="5\n6\n7\n"))
    good = task_ids.split()
    bad = submit(addr, "fail", "boom")
    term = run_on_terminal(
        "wait", *good, bad, "--timeout-s", "20", "--master", addr, stdout_on_terminal=False
    )

    # then stdout holds exactly the plain lines, and the terminal the bar
    assert term.returncode == EXIT_TASK_FAILED, term
    rows = {line.split()[0]: line.split()[1:3] for line in term.stdout.splitlines()}
    assert rows == {
        good[0]: ["SUCCEEDED", "25"],
        good[1]: ["SUCCEEDED", "36"],
        good[2]: ["SUCCEEDED", "49"],
        bad: ["FAILED", "RuntimeError:"],
    }
    assert "4/4" in term.screen, term.screen
    assert "3 succeeded" in term.screen
    assert "1 failed" in term.screen
    assert good[0] not in term.screen


def test_stats_on_a_terminal_is_a_table(
    cluster: tuple[MasterProc, WorkerProc], addr: str, idle_queue: str
) -> None:
    submit(addr, "square", "1", "--queue", idle_queue)
    worker_id = next(
        w["worker_id"]
        for w in json.loads(ok(run("stats", "--json", "--master", addr)))["workers"]
        if w["pid"] == cluster[1].pid
    )

    term = run_on_terminal("stats", "--master", addr)

    assert term.returncode == 0, term.screen
    assert "Queues" in term.screen
    assert "Workers" in term.screen
    rows = [
        [cell.strip() for cell in line.strip("│┃ ").split("│")]
        for line in term.screen.splitlines()
        if "│" in line
    ]
    queue_row = next(row for row in rows if row[0] == idle_queue)  # the queues table's
    assert queue_row[1:6] == ["1", "0", "0", "0", "0"], term.screen
    assert re.fullmatch(r"\d+ s", queue_row[6]), term.screen  # its task's wait so far
    (worker_row,) = [row for row in rows if row[0] == worker_id]
    assert worker_row[2:] == ["default", "4", "0"], term.screen
    header = next(line for line in term.screen.splitlines() if "QUEUE" in line)
    assert "┃" in header  # drawn by rich, not the plain table


# -- bad input ----------------------------------------------------------------


def test_unknown_subcommand() -> None:
    refused(run("frobnicate"), "frobnicate", code=EXIT_USAGE)


def test_no_subcommand() -> None:
    refused(run(), "command", code=EXIT_USAGE)


@pytest.mark.parametrize("command", ["get", "cancel", "wait"])
def test_missing_task_id(command: str) -> None:
    refused(run(command, "--master", "127.0.0.1:1"), "ID", code=EXIT_USAGE)


def test_submit_without_a_name() -> None:
    refused(run("submit", "--master", "127.0.0.1:1"), "name", code=EXIT_USAGE)


def test_submit_empty_name(addr: str) -> None:
    refused(run("submit", "", "--master", addr), "name", "empty", code=EXIT_USAGE)


def test_kwarg_without_equals(addr: str) -> None:
    refused(
        run("submit", "add", "1", "--kwarg", "b2", "--master", addr),
        "--kwarg",
        "KEY=",
        code=EXIT_USAGE,
    )


def test_meta_without_equals(addr: str) -> None:
    refused(run("submit", "whoami", "--meta", "k", "--master", addr), "--meta", code=EXIT_USAGE)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--priority", "high"),
        ("--delay-s", "-1"),
        ("--max-attempts", "-2"),
        ("--wait-timeout-s", "0"),
    ],
)
def test_bad_submit_option_values(flag: str, value: str) -> None:
    refused(run("submit", "square", "1", flag, value, "--master", "127.0.0.1:1"), flag, code=2)


INT32 = "from -2147483648 to 2147483647"
SECONDS = "more than 0 and at most 315576000000"


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["submit", "square", "--priority", "99999999999"], "--priority", INT32),
        (["submit", "square", "--priority", "-2147483649"], "--priority", INT32),
        (["submit", "square", "--max-attempts", "2147483648"], "--max-attempts", "from 0 to"),
        (["submit", "square", "--timeout-s", "inf"], "--timeout-s", SECONDS),
        (["submit", "square", "--timeout-s", "nan"], "--timeout-s", SECONDS),
        (["submit", "square", "--timeout-s", "1e300"], "--timeout-s", SECONDS),
        (["submit", "square", "--delay-s", "inf"], "--delay-s", "more than 0 and at most"),
        (["submit", "square", "--delay-s", "nan"], "--delay-s", "more than 0 and at most"),
        (["submit", "square", "--delay-s", "1e300"], "--delay-s", "more than 0 and at most"),
        (["submit", "square", "--wait", "--wait-timeout-s", "nan"], "--wait-timeout-s", SECONDS),
        (["wait", "some-id", "--timeout-s", "inf"], "--timeout-s", SECONDS),
        (["submit", "square", "--meta", "k=\udcff"], "--meta", "UTF-8"),
        (["submit", "sq\udcff"], "name", "UTF-8"),
        (["get", "id-\udcff"], "ID", "UTF-8"),
    ],
)
def test_out_of_range_flags_are_one_line_naming_the_range(
    addr: str, args: list[str], flag: str, allowed: str
) -> None:
    # A live master: the value must be refused before anything is sent to it.
    refused(run(*args, "--master", addr), flag, allowed, code=EXIT_USAGE)


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["get", "ID"],
        ["submit", "square", "--from-stdin"],
        ["submit", "square", "--from-stdin", "--wait"],
    ],
)
def test_output_into_a_closed_pipe_exits_quietly(
    addr: str, idle_queue: str, args: list[str]
) -> None:
    # Given a command whose stdout is a pipe nobody reads any more (`| head -1`)
    task_id = submit(addr, "square", "2")
    wait_final(addr, task_id)
    args = [task_id if a == "ID" else a for a in args]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [TASKFLEET, *args, "--master", addr],
            input="".join(f"{n}\n" for n in range(5)).encode(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=_env(),
            cwd=TESTS_DIR,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(write_end)

    # then it stops at once, with SIGPIPE's status and nothing on stderr
    # (with --wait, the ids it created go to stderr before the results fail to print)
    stderr = proc.stderr.decode()
    assert proc.returncode == 141, stderr
    assert "Traceback" not in stderr
    assert "Error" not in stderr
    assert all(line.startswith("taskfleet: submitted ") for line in stderr.splitlines())


@pytest.mark.parametrize("command", ["get", "cancel", "wait"])
def test_unknown_task_id(addr: str, command: str) -> None:
    refused(run(command, "no-such-task", "--master", addr), "no-such-task", "not found")


def test_closed_port(idle_queue: str) -> None:
    closed = f"127.0.0.1:{free_port()}"
    commands = (
        ["submit", "square", "1"],
        ["submit", "square", "1", "--wait"],
        ["get", "some-id"],
        ["wait", "some-id"],
        ["cancel", "some-id"],
        ["stats"],
    )

    def attempt(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        return run(*args, "--master", closed, timeout_s=20), time.monotonic() - started

    # At once: each retries for a few seconds before it gives up.
    with ThreadPoolExecutor(len(commands)) as pool:
        outcomes = list(pool.map(attempt, commands))
    for args, (proc, took_s) in zip(commands, outcomes, strict=True):
        assert took_s < 15, args
        line = refused(proc, closed, code=EXIT_TASK_FAILED)
        assert "master" in line, line
        assert proc.stdout == "", args


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", ":50051"])
def test_bad_master_address(address: str) -> None:
    refused(run("stats", "--master", address), "--master", "HOST:PORT", code=EXIT_USAGE)
    refused(
        run("submit", "square", "1", env={"TASKFLEET_MASTER": address}),
        "--master",
        code=EXIT_USAGE,
    )


def test_master_listen_nonsense() -> None:
    refused(run("master", "--listen", "nonsense"), "--listen", "nonsense", code=EXIT_USAGE)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_master_public_listen_needs_token_or_insecure(host: str) -> None:
    listen = f"{host}:{free_port()}"
    line = refused(run("master", "--listen", listen, "--store", "memory"), "--listen")
    assert "--token" in line
    assert "--insecure" in line
    # The same through the environment.
    proc = run("master", "--store", "memory", env={"TASKFLEET_LISTEN": listen})
    refused(proc, "--listen", code=EXIT_USAGE)


def test_master_bad_heartbeat() -> None:
    proc = run(
        "master", "--listen", f"127.0.0.1:{free_port()}", "--heartbeat-s", "5", "--lease-s", "1"
    )
    refused(proc, "--heartbeat-s", code=EXIT_USAGE)


def test_worker_without_tasks() -> None:
    refused(run("worker", "--master", "127.0.0.1:1"), "--tasks", code=EXIT_USAGE)


def test_worker_unknown_tasks_module() -> None:
    proc = run("worker", "--tasks", "no_such_module", "--master", "127.0.0.1:1")
    refused(proc, "--tasks", "no_such_module", code=EXIT_USAGE)


def test_worker_tasks_module_without_tasks() -> None:
    # ``json`` imports fine but registers nothing.
    proc = run("worker", "--tasks", "json", "--master", "127.0.0.1:1")
    refused(proc, "--tasks", "json", code=EXIT_USAGE)


def test_worker_bad_pool() -> None:
    proc = run("worker", "--tasks", EXAMPLES, "--pool", "fibers", "--master", "127.0.0.1:1")
    refused(proc, "--pool", "fibers", code=EXIT_USAGE)


def test_worker_bad_master_address() -> None:
    proc = run("worker", "--tasks", EXAMPLES, "--master", "nonsense")
    refused(proc, "--master", "nonsense", code=EXIT_USAGE)


# -- entry points -------------------------------------------------------------


@pytest.mark.parametrize("module", ["taskfleet.master", "taskfleet.worker"])
def test_python_m_help(module: str) -> None:
    out = ok(run("--help", exe=[sys.executable, "-m", module]))
    assert "usage:" in out
    assert "TASKFLEET_" in out


def test_console_script_help() -> None:
    out = ok(run("--help"))
    for command in ("master", "worker", "submit", "get", "wait", "cancel", "stats"):
        assert command in out


def test_taskfleet_master_serves(tmp_path: Path) -> None:
    """``taskfleet master`` (the console script, not ``-m``) serves the API and
    stops cleanly on SIGTERM."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "master.log"
    with open(log, "wb") as out:
        master = subprocess.Popen(
            [TASKFLEET, "master", "--listen", address, "--store", "memory"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=tmp_path,
        )
    try:

        def serving() -> bool:
            assert master.poll() is None, log.read_text()
            return run("stats", "--master", address).returncode == 0

        poll(serving, 20, "taskfleet master to serve")
        master.terminate()
        assert master.wait(20) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()


def test_a_name_no_worker_takes_is_submitted_with_a_warning_and_shown_in_stats(
    addr: str, idle_queue: str
) -> None:
    # The worker serves "default" and registers e2etasks: "squar" is a typo.
    typo = run("submit", "squar", "7", "--master", addr)
    assert "no connected worker takes 'squar' on queue 'default'" in typo.stderr
    task_id = ok(typo).strip()
    idle = run("submit", "square", "1", "--queue", idle_queue, "--master", addr)
    assert f"on queue '{idle_queue}'" in idle.stderr
    served = run("submit", "square", "2", "--master", addr)
    assert ok(served) and served.stderr == ""

    stats = json.loads(ok(run("stats", "--json", "--master", addr)))
    unserved = {(u["queue"], u["name"]): u["pending"] for u in stats["unserved"]}
    assert unserved[("default", "squar")] >= 1
    assert unserved[(idle_queue, "square")] == 1
    assert ("default", "square") not in unserved
    text = ok(run("stats", "--master", addr))
    assert "Pending tasks no connected worker takes:" in text
    assert "squar " in text
    ok(run("cancel", task_id, "--master", addr))
