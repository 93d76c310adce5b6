"""``make bench-retention``: what retention does to a SQLite master's file, and
how fast the store deletes expired tasks.

1. File size per round: a master on a fresh SQLite file with a short result
   TTL and two workers runs rounds of no-op tasks; after each round it waits
   until every finished task is pruned and reads the file's size (with its WAL).
2. Pruning rate: a SqliteStore in this process holds finished tasks whose TTL
   has run out, and the lifecycle prunes them as the master's reaper does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measuring import free_port, poll

from taskfleet.common.client import Client, make_spec
from taskfleet.common.model import Outcome, TaskSpec, TaskState
from taskfleet.master.lifecycle import Lifecycle
from taskfleet.master.store import SqliteStore, StorePolicy

PY = sys.executable


def file_sizes(rounds: int, tasks: int, ttl_s: float) -> list[float]:
    """MB of the database file and its WAL after each round has been pruned."""
    with tempfile.TemporaryDirectory(prefix="taskfleet-retention-") as tmp:
        db = Path(tmp) / "bench.db"
        address = f"127.0.0.1:{free_port()}"
        quiet = ["--log-level", "WARNING"]
        master = subprocess.Popen(
            [
                PY,
                "-m",
                "taskfleet.master",
                "--listen",
                address,
                "--store",
                f"sqlite:{db}",
                "--result-ttl-s",
                str(ttl_s),
                *quiet,
            ],
        )
        workers = [
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "taskfleet.worker",
                    "--master",
                    address,
                    "--tasks",
                    "taskfleet.worker.examples",
                    *quiet,
                ],
            )
            for _ in range(2)
        ]
        client = Client(address)
        sizes = []
        try:
            poll(lambda: len(client.stats().workers) == 2, "workers", proc=master)
            for number in range(1, rounds + 1):
                ids = client.submit_many(make_spec("noop", ()) for _ in range(tasks))
                assert sum(1 for _ in client.wait(ids)) == tasks
                poll(lambda: not client.stats().queues, "pruning", timeout_s=120)
                size_mb = sum(p.stat().st_size for p in Path(tmp).glob("bench.db*")) / 1e6
                sizes.append(size_mb)
                print(f"round {number}: {tasks} tasks, file + WAL {size_mb:.1f} MB", flush=True)
        finally:
            client.close()
            for proc in [*workers, master]:
                proc.terminate()
            for proc in [*workers, master]:
                proc.wait(30)
    return sizes


def pruning_rate(tasks: int) -> float:
    """Finished tasks deleted per second by the lifecycle's prune, as the reaper runs it."""
    with tempfile.TemporaryDirectory(prefix="taskfleet-prune-") as tmp:
        store = SqliteStore(f"{tmp}/prune.db", StorePolicy(result_ttl_s=1.0))
        try:
            now = time.time()
            for start in range(0, tasks, 10_000):
                count = min(10_000, tasks - start)
                store.submit([TaskSpec("noop") for _ in range(count)], now)
                leases = store.lease("w", ["default"], None, count, 60, now)
                store.record(
                    [Outcome(one.ref, TaskState.SUCCEEDED, b"null") for one in leases], now
                )
            lifecycle = Lifecycle(store, max_payload_bytes=1 << 20)
            time.sleep(1.0)  # the 1 s TTL must run out before pruning starts
            started = time.perf_counter()
            pruned = 0
            while pruned < tasks:
                pruned += lifecycle.prune()
            return pruned / (time.perf_counter() - started)
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per round")
    parser.add_argument("--ttl-s", type=float, default=2.0)
    parser.add_argument("--prune-tasks", type=int, default=200_000)
    args = parser.parse_args()
    sizes = file_sizes(args.rounds, args.tasks, args.ttl_s)
    print(f"last round / first round: {sizes[-1] / sizes[0]:.2f}x")
    rate = pruning_rate(args.prune_tasks)
    print(f"pruning: {rate:,.0f} tasks/s ({args.prune_tasks} expired tasks, 500 per transaction)")


if __name__ == "__main__":
    main()
