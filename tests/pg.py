"""A throwaway PostgreSQL server for the store tests, one per test session.

``TASKFLEET_TEST_PG_DSN`` names a server to use instead (an admin connection:
each test creates and drops a database of its own). Otherwise the first test
that needs one starts a cluster with the local binaries (``pg_config --bindir``)
in a temporary directory, without fsync, on a free loopback port; as root it
runs as the ``postgres`` user. Without either, tests that need it skip, or fail
in CI (see system.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from system import missing

DSN_ENV = "TASKFLEET_TEST_PG_DSN"
_START_TIMEOUT_S = 60


class _Cluster:
    def __init__(self) -> None:
        self.admin_dsn = ""
        self.problem = ""
        self.data_dir: Path | None = None
        self.bindir = ""
        self.root: Path | None = None

    def start(self) -> None:
        pg_config = shutil.which("pg_config")
        if pg_config is None:
            self.problem = "PostgreSQL is not installed (no pg_config; make system-deps)"
            return
        self.bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if not (Path(self.bindir) / "initdb").exists():
            self.problem = f"no initdb in {self.bindir} (install Debian's postgresql package)"
            return
        self.root = Path(tempfile.mkdtemp(prefix="taskfleet-pg-"))
        if os.getuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.data_dir = self.root / "data"
        port = _free_port()
        try:
            self._as_owner(
                "initdb",
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            )
            options = (
                f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                f"-c listen_addresses=127.0.0.1 -p {port} -k {self.root}"
            )
            self._as_owner(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "start",
            )
        except subprocess.CalledProcessError as exc:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            self.problem = f"could not start PostgreSQL: {exc.stderr or exc}\n{tail}"
            return
        self.admin_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _as_owner(self, tool: str, *args: str) -> None:
        command = [str(Path(self.bindir) / tool), *args]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        """Kill the server by the pid in its pid file (an immediate stop: nothing to keep)."""
        if self.data_dir is not None:
            pid_file = self.data_dir / "postmaster.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().splitlines()[0])
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)  # the postmaster's "immediate shutdown"
                _wait_gone(pid)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _wait_gone(pid: int) -> None:
    # The postmaster is not our child, so it cannot be waited on: poll, with a deadline.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_cluster: _Cluster | None = None


def admin_dsn() -> str:
    """An admin connection to a server; skips (or fails in CI) when none can be had."""
    global _cluster
    dsn = os.environ.get(DSN_ENV, "")
    if dsn:
        return dsn
    if _cluster is None:
        _cluster = _Cluster()
        _cluster.start()
    if _cluster.problem:
        missing(_cluster.problem)
    return _cluster.admin_dsn


def stop() -> None:
    """Stop the session's server, if one was started."""
    if _cluster is not None:
        _cluster.stop()


def with_database(dsn: str, name: str) -> str:
    """``dsn`` (a URL) naming database ``name`` instead, its query kept."""
    address, mark, query = dsn.partition("?")
    base, _, _ = address.rpartition("/")
    return f"{base}/{name}{mark}{query}"


@contextmanager
def database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    import psycopg

    admin = admin_dsn()
    name = f"taskfleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextmanager
def store_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """The ``--store`` URL of a new, empty store of ``kind``: memory, sqlite or postgres."""
    if kind == "memory":
        yield "memory"
    elif kind == "sqlite":
        yield f"sqlite:{tmp_path / 'tasks.db'}"
    else:
        with database() as url:
            yield url
