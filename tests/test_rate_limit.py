"""``--rate-limit NAME=N/s``: tasks of NAME are leased at most at that rate across
all workers and masters, and the tasks held back do not starve other work.

Pacing is proven by a lower bound on the spread of start times (the bucket holds
one second's worth, so 60 tasks at 20/s cannot all start within 2 s); no test
asserts how fast anything runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from taskfleet.common.client import make_spec
from taskfleet.common.model import TaskState
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.ratelimit import LocalBuckets, RateLimiter, burst_of
from taskfleet.master.store import MemoryStore, open_store
from taskfleet.master.store.base import Bus

import pg
from procs import MasterProc, WorkerProc
from test_cli import refused, run

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]

LIMIT = ["--rate-limit", "square=20/s"]
# (60 - burst of 20) / 20 per second = 2 s; a little is left for the start of the
# first task lagging its lease.
MIN_SPREAD_S = 1.8


def test_the_bucket_grants_its_burst_then_the_rate() -> None:
    now = [100.0]
    buckets = LocalBuckets(clock=lambda: now[0])
    assert burst_of(20) == 20 and burst_of(0.5) == 1
    assert buckets.take_tokens("a", 30, 20, 20) == 20  # starts full, never beyond the burst
    assert buckets.take_tokens("a", 5, 20, 20) == 0
    assert buckets.take_tokens("b", 1, 20, 20) == 1  # each name has its own bucket
    now[0] += 0.26
    assert buckets.take_tokens("a", 10, 20, 20) == 5  # 0.26 s at 20/s: 5 whole tokens
    now[0] += 0.01
    assert buckets.take_tokens("a", 10, 20, 20) == 0  # 0.2 + 0.2 of a token left
    now[0] += 60
    assert buckets.take_tokens("a", 100, 20, 20) == 20  # refilled to the burst, not beyond


def _run_limited_and_free(master: MasterProc, submit_to: MasterProc | None = None) -> None:
    """60 limited squares, then 60 unlimited tasks; all succeed, paced and unstarved."""
    with (submit_to or master).client() as client:
        limited = client.submit_many([make_spec("square", [n]) for n in range(60)])
        free = client.submit_many([make_spec("not_seven", [n]) for n in range(100, 160)])
        tasks = {t.id: t for t in client.wait(limited + free, timeout_s=60)}
    assert all(t.state is TaskState.SUCCEEDED for t in tasks.values())
    started = sorted(tasks[i].started_at for i in limited)
    assert started[-1] - started[0] >= MIN_SPREAD_S, started
    # The unlimited tasks, submitted after all limited ones, were not held up behind them.
    assert max(tasks[i].finished_at for i in free) < started[-1]


def test_a_rate_limit_paces_its_tasks_while_other_tasks_run_freely(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    master = start_master(extra=LIMIT)
    for _ in range(2):
        start_worker(master).wait_connected()
    _run_limited_and_free(master)


def test_masters_sharing_postgresql_share_the_limit(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    with pg.database() as db:
        a, b = (start_master(store=db, extra=LIMIT) for _ in range(2))
        workers = [start_worker(a), start_worker(b)]
        for worker in workers:
            worker.wait_connected()
        _run_limited_and_free(a, submit_to=b)
        for proc in [*workers, a, b]:  # before their database is dropped
            proc.stop()


@pytest.mark.parametrize(
    "value", ["square", "square=0/s", "square=-3/s", "square=2/d", "=2/s", "square=x/s"]
)
def test_a_bad_rate_limit_is_refused_naming_the_flag(value: str) -> None:
    refused(run("master", "--store", "memory", "--rate-limit", value), "--rate-limit", code=2)


def test_a_name_limited_twice_is_refused() -> None:
    proc = run("master", "--store", "memory", "--rate-limit", "a=1/s", "--rate-limit", "a=2/m")
    refused(proc, "--rate-limit", code=2)


def test_takes_from_the_shared_bucket_are_atomic() -> None:
    """Eight threads on two stores (two connection pools, as two masters have)
    take one token at a time from a row refilled at 1/s: together they get the
    burst plus the few refilled meanwhile, never a token twice."""
    with pg.database() as db:
        stores = [open_store(db) for _ in range(2)]
        buses = [bus for store in stores if (bus := store.bus()) is not None]
        taken: list[int] = []

        def take(bus: Bus) -> None:
            for _ in range(40):
                taken.append(bus.take_tokens("k", 1, 1.0, 50.0))

        threads = [threading.Thread(target=take, args=(buses[i % 2],)) for i in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        elapsed_s = time.monotonic() - started
        for store in stores:
            store.close()
    assert len(taken) == 320
    assert 50 <= sum(taken) <= 50 + elapsed_s + 1, (sum(taken), elapsed_s)


def test_lease_holds_back_a_limited_name_and_hands_out_the_rest() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    limiter = RateLimiter({"a": 1.0}, LocalBuckets(clock), clock)
    lifecycle = Lifecycle(MemoryStore(), max_payload_bytes=1024, limiter=limiter)
    a_ids = lifecycle.submit([make_spec("a", [n]) for n in range(3)])
    b_ids = lifecycle.submit([make_spec("b", [n]) for n in range(2)])

    def lease(names: list[str] | None, limit: int = 10) -> list[str]:
        leases = lifecycle.lease("w", ["default"], names, limit, 30.0)
        return sorted(lease.task.id for lease in leases)

    # One token for "a" (its burst): the other two go back to PENDING, their
    # attempts not counted, and "b" is handed out beside them.
    assert lease(["a", "b"]) == sorted([a_ids[0], *b_ids])
    held = [lifecycle.store.get(i) for i in a_ids[1:]]
    assert [(t.state, t.attempts) for t in held] == [(TaskState.PENDING, 0)] * 2
    # Until the next token is due, "a" is not even asked for, with names or
    # without: a later task of another name gets the one free slot.
    assert lease(["a", "b"]) == [] and lease(None) == []
    later = lifecycle.submit([make_spec("b", [9])])
    assert lease(None, limit=1) == later
    now[0] += 1.0
    assert lease(None) == [a_ids[1]]
    now[0] += 1.0
    assert lease(["a"]) == [a_ids[2]]
