"""What every side of the benchmark measures with, in one place: the taskfleet
side (run.py) and the Celery side (celery_side.py, in its own venv) must
compute the same figures the same way. Standard library only, so both can
import it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


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


def trip_figures(trips: list[float]) -> dict[str, float]:
    """W3's figures from its round trips, in seconds."""
    return {
        "w3_p50_ms": percentile(trips, 0.50) * 1000,
        "w3_p99_ms": percentile(trips, 0.99) * 1000,
    }
