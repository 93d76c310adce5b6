"""A throwaway PostgreSQL server for the store tests, one per test session.

``TASKFLEET_TEST_PG_DSN`` names a server to use instead (an admin connection:
each test creates and drops a database of its own). Otherwise the first test
that needs one starts a cluster with the local binaries (``pg_config --bindir``)
in a temporary directory, without fsync, on a free loopback port; as root it
runs as the ``postgres`` user. Without either, tests that need it skip, or fail
in CI (see system.py).

The benchmark (bench/run.py) asks for a ``durable`` server instead: PostgreSQL's
default settings (fsync, synchronous_commit and full_page_writes on), as a user
runs it. The tests keep theirs off: it is faster and a test keeps nothing.

A test that stops or restarts its server gets one of its own (``own_server``),
durable, so that a stop as abrupt as a crash loses nothing committed; it needs
the local binaries even when ``TASKFLEET_TEST_PG_DSN`` is set.
"""

from __future__ import annotations

import os
import shlex
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


# What the tests' server turns off; a durable one keeps PostgreSQL's defaults.
_UNSAFE_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "


class _Cluster:
    def __init__(self, durable: bool) -> None:
        self.durable = durable
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
            options = ("" if self.durable else _UNSAFE_SETTINGS) + (
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


# The session's servers, by durability: each started when first asked for.
_clusters: dict[bool, _Cluster] = {}


def problem(durable: bool = False) -> str:
    """Why no server can be had ("" when one can), starting one if need be."""
    if os.environ.get(DSN_ENV, ""):
        return ""
    if durable not in _clusters:
        _clusters[durable] = cluster = _Cluster(durable)
        cluster.start()
    return _clusters[durable].problem


def admin_dsn(durable: bool = False) -> str:
    """An admin connection to a server; skips (or fails in CI) when none can be had."""
    dsn = os.environ.get(DSN_ENV, "")
    if dsn:
        return dsn
    reason = problem(durable)
    if reason:
        missing(reason)
    return _clusters[durable].admin_dsn


def stop() -> None:
    """Stop the session's servers, if any were started."""
    for cluster in _clusters.values():
        cluster.stop()
    _clusters.clear()


def with_database(dsn: str, name: str) -> str:
    """``dsn`` (a URL) naming database ``name`` instead, its query kept."""
    address, mark, query = dsn.partition("?")
    base, _, _ = address.rpartition("/")
    return f"{base}/{name}{mark}{query}"


@contextmanager
def database(durable: bool = False) -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    with database_on(admin_dsn(durable)) as url:
        yield url


@contextmanager
def database_on(admin: str) -> Iterator[str]:
    """The URL of a new, empty database on the server ``admin`` reaches, dropped afterwards."""
    import psycopg

    name = f"taskfleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextmanager
def store_url(kind: str, tmp_path: Path, durable: bool = False) -> Iterator[str]:
    """The ``--store`` URL of a new, empty store of ``kind``: memory, sqlite or postgres
    (on a ``durable`` server if asked)."""
    if kind == "memory":
        yield "memory"
    elif kind == "sqlite":
        yield f"sqlite:{tmp_path / 'tasks.db'}"
    else:
        with database(durable) as url:
            yield url


class Server:
    """A running server of one test's own, on a fixed port, that the test may stop,
    start and restart with ``pg_ctl`` (the session's shared one must stay up)."""

    def __init__(self, cluster: _Cluster) -> None:
        assert cluster.data_dir is not None
        self._cluster = cluster
        self._data_dir = str(cluster.data_dir)
        self._log = str(cluster.data_dir.parent / "log")
        self.admin_dsn = cluster.admin_dsn
        self.up = True
        # The options it was started with, as the server wrote them down (the
        # binary and its data directory first), so a later start is the same server.
        started = shlex.split((cluster.data_dir / "postmaster.opts").read_text())
        self._options = shlex.join(started[3:])

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` ends sessions cleanly, ``immediate`` as a crash
        would (the next start recovers from the WAL)."""
        self._pg_ctl("stop", "-m", mode)
        self.up = False

    def start(self) -> None:
        self._pg_ctl("start", "-o", self._options, "-l", self._log)
        self.up = True

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("restart", "-m", mode, "-o", self._options, "-l", self._log)
        self.up = True

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._cluster._as_owner(
            "pg_ctl", "-D", self._data_dir, "-w", "-t", str(_START_TIMEOUT_S), *args, action
        )


@contextmanager
def own_server() -> Iterator[Server]:
    """A new durable server for the caller alone, removed afterwards; skips
    (or fails in CI) when none can be started."""
    cluster = _Cluster(durable=True)
    try:
        cluster.start()
        if cluster.problem:
            missing(cluster.problem)
        yield Server(cluster)
    finally:
        cluster.stop()
