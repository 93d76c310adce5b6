"""Fixtures that start real masters and workers on free loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskfleet.common.client import Client

import pg
from procs import Gates, MasterProc, WorkerProc


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres() -> Iterator[None]:
    """Stops the PostgreSQL server of tests/pg.py at the end, if a test started one."""
    yield
    pg.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[MasterProc | WorkerProc]]:
    """Every process a test starts, killed at teardown whatever happened."""
    started: list[MasterProc | WorkerProc] = []
    yield started
    unasked = [proc.exited_unasked() for proc in reversed(started)]
    for proc in reversed(started):
        proc.kill()
    # A process that ended though the test never stopped it nor waited for it died
    # on its own: a crash the test's own checks may have missed.
    crashes = [report for report in unasked if report]
    assert not crashes, "\n\n".join(crashes)


@pytest.fixture
def start_master(tmp_path: Path, procs: list[MasterProc | WorkerProc]) -> Callable[..., MasterProc]:
    def start(**kwargs: object) -> MasterProc:
        master = MasterProc(tmp_path, **kwargs)  # type: ignore[arg-type]
        procs.append(master)
        return master

    return start


@pytest.fixture
def start_worker(tmp_path: Path, procs: list[MasterProc | WorkerProc]) -> Callable[..., WorkerProc]:
    def start(master: MasterProc | str, **kwargs: object) -> WorkerProc:
        address = master if isinstance(master, str) else master.address
        worker = WorkerProc(tmp_path, address, **kwargs)  # type: ignore[arg-type]
        procs.append(worker)
        return worker

    return start


@pytest.fixture
def master(start_master: Callable[..., MasterProc]) -> MasterProc:
    """A memory-store master."""
    return start_master()


@pytest.fixture
def client(master: MasterProc) -> Iterator[Client]:
    with master.client() as c:
        yield c


@pytest.fixture
def queue_name() -> str:
    """A queue no other test uses."""
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    """Gate files for ``block_until`` tasks, all opened at teardown."""
    g = Gates(tmp_path / "gates")
    yield g
    g.open_all()
