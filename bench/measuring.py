"""What every side of the benchmark measures with, in one place: the taskfleet
side (run.py) and the peers' sides (<peer>_side.py, in the peers' venv) must
compute the same figures the same way. Standard library only, so all can
import it."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(
    check: Callable[[], bool],
    what: str,
    timeout_s: float = 60,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait for ``check``; with ``proc``, fail at once if it dies rather than at the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def trip_figures(trips: list[float], prefix: str = "w3") -> dict[str, float]:
    """W3's figures from its round trips, in seconds: ``{prefix}_p50_ms`` and ``_p99_ms``;
    nothing when there were none (``--w3 0``)."""
    if not trips:
        return {}
    return {
        f"{prefix}_p50_ms": percentile(trips, 0.50) * 1000,
        f"{prefix}_p99_ms": percentile(trips, 0.99) * 1000,
    }


# CPU per task, from /proc. Each system names its processes by role: "server"
# (taskfleet's master, the classic manager, Redis), "store" (the PostgreSQL
# server), "workers" (the processes a user starts as workers) and, counted for
# them, "pool" (every process below a worker: pool processes, prefork children,
# RQ's work horses, Dramatiq's worker processes). "client" is the process that
# submits and waits: the one measuring.
ROLES = ("server", "store", "workers", "pool", "client")
CHILDREN_ROLE = {"workers": "pool", "server": "server", "store": "store"}
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1],
    utime [11], stime [12], cutime [13], cstime [14]); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from one scan of /proc (no psutil: stdlib only)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _ticks(fields: list[str], first: int) -> int:
    return int(fields[first]) + int(fields[first + 1])


def cpu_seconds(processes: Mapping[str, Iterable[int]]) -> dict[str, float]:
    """CPU time (user + system) used so far, by role, of the processes named by role
    and of everything below them.

    A process's own time goes to its role; its live descendants' time, and that of
    the children it has reaped (cutime, cstime: a pool process replaced, an RQ work
    horse per job), goes to ``CHILDREN_ROLE`` of its role. A child that ends between
    two readings moves from the live sum to its parent's reaped sum, so a
    difference of two readings counts it once. The client is this process
    (getrusage: its own threads, not its children, which are the systems measured).
    """
    children = _children_by_parent()
    ticks = dict.fromkeys(ROLES, 0)
    for role, pids in processes.items():
        below = CHILDREN_ROLE.get(role, role)
        for pid in pids:
            fields = _stat(pid)
            if fields is None:
                continue
            ticks[role] += _ticks(fields, 11)
            ticks[below] += _ticks(fields, 13)
            stack = list(children.get(pid, ()))
            while stack:
                child = stack.pop()
                if (child_fields := _stat(child)) is not None:
                    ticks[below] += _ticks(child_fields, 11) + _ticks(child_fields, 13)
                stack.extend(children.get(child, ()))
    seconds = {role: n / _TICKS_PER_S for role, n in ticks.items()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds["client"] = usage.ru_utime + usage.ru_stime
    return seconds


def cpu_figures(
    workload: str, before: Mapping[str, float], after: Mapping[str, float], tasks: int
) -> dict[str, float]:
    """CPU microseconds per task between two ``cpu_seconds`` readings, by role and
    summed, under names such as ``w1_cpu_us_pool`` and ``w1_cpu_us_total``. Roles a
    system does not have are left out."""
    used = {role: after[role] - before[role] for role in ROLES}
    figures = {
        f"{workload}_cpu_us_{role}": seconds / tasks * 1e6
        for role, seconds in used.items()
        if seconds or role in ("server", "workers", "client")
    }
    figures[f"{workload}_cpu_us_total"] = sum(used.values()) / tasks * 1e6
    return figures


def with_cpu(
    workload: str,
    tasks: int,
    processes: Callable[[], Mapping[str, Iterable[int]]],
    run: Callable[[], float],
) -> dict[str, float]:
    """``run`` (which returns the seconds it took for ``tasks`` tasks) as a
    throughput named ``workload``, with its CPU per task beside it; nothing for a
    workload of no tasks (``--w2 0`` skips W2)."""
    if not tasks:
        return {}
    before = cpu_seconds(processes())
    elapsed_s = run()
    after = cpu_seconds(processes())
    return {workload: tasks / elapsed_s, **cpu_figures(workload, before, after, tasks)}
