"""``make bench``: taskfleet against the classic BaseManager design, in one run.

Real processes as a user runs them: a master and two workers with default
pools on this machine, beside the classic manager with two worker processes.
Each workload runs alternately on each system, ``--rounds`` times, and the
median is reported with the machine's load. Results also go to a JSON file.
Beside each throughput, the CPU each process used per task, read from /proc
(measuring.py), and the same workloads through a client made of the generated
stubs alone (raw_client.py).

With ``--peers`` (``make bench-peers``), Celery, Dramatiq and RQ, each with Redis,
join each round as more systems: bench/<peer>_side.py, run in .venv-peers' Python
so that none of them reaches taskfleet's own environment.

The postgres store runs on a throwaway server with PostgreSQL's default
durability (fsync, synchronous_commit and full_page_writes on), started as the
tests start theirs (tests/pg.py) but without the tests' unsafe settings. When
no server can be started, the table goes without that column and says why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classic import ClassicCluster
from measuring import ROLES, free_port, poll, trip_figures, with_cpu
from raw_client import RawClient

from taskfleet.common.client import Client, make_spec

PY = sys.executable
BENCH = Path(__file__).resolve().parent
# tests/pg.py starts the throwaway PostgreSQL server of the postgres store.
sys.path.append(str(BENCH.parent / "tests"))
import pg  # noqa: E402

# A backstop only: each <peer>_side.py bounds each of its own waits.
PEERS_TIMEOUT_S = 1800
PEERS = ("celery", "dramatiq", "rq")
# RQ forks a work horse per job (about 13 ms of CPU each here), so W1 and W2 run a
# tenth of the tasks on it, or its three rounds alone would take a quarter of an
# hour; its figures are per task all the same. W3 keeps its count.
PEER_SHARE = {"rq": 10}


class TaskfleetCluster:
    """A master on ``store`` (memory, sqlite or postgres) plus two workers with
    default (process) pools."""

    def __init__(self, store: str, workers: int = 2, result_ttl_s: float | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="taskfleet-bench-")
        self.store = ExitStack()
        store_url = self.store.enter_context(pg.store_url(store, Path(self.tmp.name), durable=True))
        self.address = f"127.0.0.1:{free_port()}"
        quiet = ["--log-level", "WARNING"]
        ttl = [] if result_ttl_s is None else ["--result-ttl-s", str(result_ttl_s)]
        self.master = subprocess.Popen(
            [
                PY,
                "-m",
                "taskfleet.master",
                "--listen",
                self.address,
                "--store",
                store_url,
                *ttl,
                *quiet,
            ],
            stdout=subprocess.DEVNULL,
        )
        self.client = Client(self.address)
        self.raw = RawClient(self.address)
        poll(lambda: self._serving(), "master")
        self.postmaster = postmaster_pid(store_url) if store == "postgres" else None
        self.workers = [
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "taskfleet.worker",
                    "--master",
                    self.address,
                    "--tasks",
                    "taskfleet.worker.examples",
                    *quiet,
                ],
                stdout=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        poll(lambda: len(self.client.stats().workers) == workers, "workers")
        self.run_batch([("noop", ())] * 200)  # warm up: pools started, code paths hot

    def _serving(self) -> bool:
        try:
            self.client.stats()
            return True
        except Exception:
            return False

    def run_batch(self, items: list[tuple[str, tuple[Any, ...]]]) -> float:
        start = time.perf_counter()
        ids = self.client.submit_many(make_spec(name, args) for name, args in items)
        done = sum(1 for _ in self.client.wait(ids))
        elapsed = time.perf_counter() - start
        assert done == len(items), f"only {done} of {len(items)} finished"
        return elapsed

    def submit_only(self, n: int) -> float:
        start = time.perf_counter()
        self.client.submit_many(make_spec("nobody_runs_this", (i,)) for i in range(n))
        return time.perf_counter() - start

    def round_trip(self, item: tuple[str, tuple[Any, ...]]) -> float:
        """One task, submitted and waited for in one call (``Client.run``)."""
        start = time.perf_counter()
        self.client.run(item[0], item[1], timeout_s=30)
        return time.perf_counter() - start

    def round_trip_two_calls(self, item: tuple[str, tuple[Any, ...]]) -> float:
        """One task, submitted, then waited for: a call each."""
        start = time.perf_counter()
        task_id = self.client.submit(item[0], item[1])
        self.client.result(task_id, timeout_s=30)
        return time.perf_counter() - start

    def processes(self) -> dict[str, list[int]]:
        """Its processes by role, for CPU per task (measuring.cpu_seconds)."""
        return {
            "server": [self.master.pid],
            "workers": [worker.pid for worker in self.workers],
            "store": [] if self.postmaster is None else [self.postmaster],
        }

    def master_rss_mb(self) -> float:
        with open(f"/proc/{self.master.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.client.close()
        self.raw.close()
        for proc in [*self.workers, self.master]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.master]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.store.close()
        self.tmp.cleanup()


@dataclass
class Figures:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        values = self.samples.get(key)
        return statistics.median(values) if values else float("nan")


def measure_classic(args: argparse.Namespace) -> dict[str, float]:
    """One round of the baseline; a fresh manager each round, like the others."""
    classic = ClassicCluster(free_port())
    try:
        figures = {
            **with_cpu(
                "w1", args.w1, classic.processes, lambda: classic.run_batch(["noop"] * args.w1)
            ),
            **with_cpu(
                "w2", args.w2, classic.processes, lambda: classic.run_batch(list(range(args.w2)))
            ),
        }
        trips = [classic.round_trip(7) for _ in range(args.w3)]
    finally:
        classic.close()
    return {**figures, **trip_figures(trips)}


def measure_taskfleet(store: str, args: argparse.Namespace) -> dict[str, float]:
    """One round of taskfleet on ``store``, through taskfleet's Client and through
    the generated stubs alone (``raw``: W1s and the raw round trips); only
    taskfleet has a submit-only figure, as only it submits in batches."""
    w1 = [("noop", ())] * args.w1
    w2 = [("square", (n,)) for n in range(args.w2)]
    trip = ("square", (7,))
    cluster = TaskfleetCluster(store, result_ttl_s=args.result_ttl_s)
    try:
        figures = {
            **with_cpu("w1", args.w1, cluster.processes, lambda: cluster.run_batch(w1)),
            **with_cpu("w1s", args.w1, cluster.processes, lambda: cluster.raw.per_task_stream(w1)),
            **with_cpu("w2", args.w2, cluster.processes, lambda: cluster.run_batch(w2)),
        }
        for prefix, one in (
            ("w3", cluster.round_trip),
            ("w3_two_calls", cluster.round_trip_two_calls),
            ("w3_raw", cluster.raw.submit_and_wait),
            ("w3_raw_two_calls", cluster.raw.submit_then_wait),
        ):
            figures.update(trip_figures([one(trip) for _ in range(args.w3)], prefix))
        if args.submit:
            figures["submit"] = args.submit / cluster.submit_only(args.submit)
    finally:
        cluster.close()
    return figures


def measure_peer(peer: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    """One round of ``peer`` with Redis: its figures (same names as ours) and its versions.

    A subprocess in the peers' venv (bench/<peer>_side.py), which starts and stops
    its own Redis and workers; a fresh one each round, as the other systems get.
    """
    share = PEER_SHARE.get(peer, 1)
    command = [
        args.peers_python,
        str(BENCH / f"{peer}_side.py"),
        *("--w1", str(args.w1 // share), "--w2", str(args.w2 // share), "--w3", str(args.w3)),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=PEERS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the side stops its workers and Redis on SIGTERM
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with status {proc.returncode}")
    report = json.loads(out)
    versions = report.pop("versions")
    return report, versions


def postmaster_pid(store_url: str) -> int | None:
    """The pid of the PostgreSQL server behind ``store_url``, from its postmaster.pid,
    so that its CPU (the postmaster and every backend below it) counts as "store";
    None when the file cannot be read (a server on another machine or user)."""
    import psycopg

    with psycopg.connect(store_url) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    try:
        return int((Path(row[0] if row else "") / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def postgres_settings() -> dict[str, str]:
    """The durability settings of the server the postgres store runs on, as it reports them."""
    import psycopg

    names = ("fsync", "synchronous_commit", "full_page_writes")
    with psycopg.connect(pg.admin_dsn(durable=True)) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures = Figures()
    loads: list[float] = []
    peers: dict[str, dict[str, str]] = {}
    systems = ("classic", *args.peers, *args.stores)
    for round_no in range(1, args.rounds + 1):
        for system in systems:
            loads.append(os.getloadavg()[0])
            print(f"round {round_no}: {system} ...", file=sys.stderr, flush=True)
            if system == "classic":
                results = measure_classic(args)
            elif system in PEERS:
                results, peers[system] = measure_peer(system, args)
            else:
                results = measure_taskfleet(system, args)
            for key, value in results.items():
                figures.add(f"{system}.{key}", value)
    depth = (
        {store: measure_depth(store, args.depth, args.w1) for store in args.stores}
        if args.depth
        else {}
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_1m_during_runs": [round(x, 2) for x in loads],
        },
        "params": vars(args),
        "samples": figures.samples,
        "medians": {key: figures.median(key) for key in figures.samples},
        "depth": depth,
        **({"postgres": postgres_settings()} if "postgres" in args.stores else {}),
        **({"peers": peers} if peers else {}),
    }


def measure_depth(store: str, depth: int, w1: int) -> dict[str, float]:
    """Master RSS with ``depth`` tasks queued that no worker takes, and W1 on top of them."""
    print(f"depth: {store} with {depth:,} queued ...", file=sys.stderr, flush=True)
    cluster = TaskfleetCluster(store)
    try:
        empty = w1 / cluster.run_batch([("noop", ())] * w1)
        submit_s = cluster.submit_only(depth)
        deep = w1 / cluster.run_batch([("noop", ())] * w1)
        return {
            "queued": depth,
            "submit_per_s": depth / submit_s,
            "master_rss_mb": cluster.master_rss_mb(),
            "w1_empty_per_s": empty,
            "w1_deep_per_s": deep,
            "deep_vs_empty": deep / empty,
        }
    finally:
        cluster.close()


def print_table(report: dict[str, Any]) -> None:
    med = report["medians"]
    p = report["params"]
    stores = p["stores"]
    peers = p.get("peers") or []
    systems = ["classic", *peers, *stores]
    # Ratios: each store against classic; with peers, the first store against each.
    pairs = [("classic", store) for store in stores] + [(peer, stores[0]) for peer in peers]
    rows = [("workload", *systems, *(f"{store}/{base}" for base, store in pairs))]

    def value(system: str, key: str) -> float | None:
        found = med.get(f"{system}.{key}")
        return None if found is None or found != found else float(found)

    def row(label: str, key: str, fmt: str, better: str = "", base_key: str = "") -> None:
        """One line; ``better`` ("higher" or "lower") adds the ratios, each taken
        against the base's ``base_key`` (``key`` unless given)."""

        def ratio(base: str, system: str) -> str:
            b, v = value(base, base_key or key), value(system, key)
            if not better or b is None or not v:
                return ""
            return f"{(v / b if better == 'higher' else b / v):.2f}x"

        cells = [value(system, key) for system in systems]
        if all(cell is None for cell in cells):
            return
        rows.append(
            (
                label,
                *("-" if cell is None else fmt.format(cell) for cell in cells),
                *(ratio(base, system) for base, system in pairs),
            )
        )

    row(f"W1 {p['w1']:,} no-op tasks/s", "w1", "{:,.0f}", "higher")
    row("W1s same, stubs, per-task WaitTasks/s", "w1s", "{:,.0f}", "higher", base_key="w1")
    row(f"W2 {p['w2']:,} n*n tasks/s", "w2", "{:,.0f}", "higher")
    for label, prefix in (
        ("W3 round trip (Client.run)", "w3"),
        ("W3 Client submit, result", "w3_two_calls"),
        ("W3 stubs SubmitAndWait", "w3_raw"),
        ("W3 stubs Submit, WaitTasks", "w3_raw_two_calls"),
    ):
        row(f"{label} p50 ms", f"{prefix}_p50_ms", "{:.2f}", "lower" if prefix == "w3" else "")
        row(f"{label} p99 ms", f"{prefix}_p99_ms", "{:.2f}", "lower" if prefix == "w3" else "")
    row(f"submit {p['submit']:,} (batches of 1,000)/s", "submit", "{:,.0f}")
    for workload, name in (("w1", "W1"), ("w1s", "W1s")):
        row(f"{name} CPU us/task, all processes", f"{workload}_cpu_us_total", "{:.0f}")
        for role in ROLES:
            row(f"  {role}", f"{workload}_cpu_us_{role}", "{:.0f}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    loads = report["machine"]["load_1m_during_runs"]
    print(
        f"\nmedians of {p['rounds']} alternating rounds; {report['machine']['cpus']} CPUs; "
        f"1-minute load during runs {min(loads):.2f}-{max(loads):.2f}"
    )
    if "postgres" in report:
        settings = ", ".join(f"{name}={value}" for name, value in report["postgres"].items())
        print(f"postgres: one master, a local server with {settings}")
    elif report.get("postgres_skipped"):
        print(f"postgres: not measured: {report['postgres_skipped']}")
    for peer, versions in report.get("peers", {}).items():
        share = PEER_SHARE.get(peer, 1)
        counts = f" (W1 and W2 on 1/{share} of the tasks)" if share > 1 else ""
        print(f"{peer}: " + ", ".join(f"{name} {v}" for name, v in versions.items()) + counts)
    for store, d in report["depth"].items():
        print(
            f"depth {store}: {d['queued']:,} queued, master RSS {d['master_rss_mb']:.0f} MB, "
            f"submit {d['submit_per_s']:,.0f}/s, W1 empty {d['w1_empty_per_s']:,.0f}/s, "
            f"W1 deep {d['w1_deep_per_s']:,.0f}/s ({d['deep_vs_empty']:.0%})"
        )


def peer_list(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer {', '.join(unknown)}; of {', '.join(PEERS)}"
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--w1", type=int, default=20_000)
    parser.add_argument("--w2", type=int, default=2_000)
    parser.add_argument("--w3", type=int, default=500, help="round trips per round")
    parser.add_argument("--submit", type=int, default=20_000)
    parser.add_argument(
        "--depth", type=int, default=0, help="queue depth for the depth check (0: skip)"
    )
    parser.add_argument(
        "--stores",
        default="memory,sqlite,postgres",
        type=lambda s: s.split(","),
        help="of memory, sqlite, postgres (a throwaway server with fsync on; left out "
        "with a note when none can be started)",
    )
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument(
        "--result-ttl-s",
        type=float,
        default=None,
        help="the masters' --result-ttl-s (a short one keeps pruning busy during the run)",
    )
    parser.add_argument(
        "--peers",
        nargs="?",
        const=",".join(PEERS),
        default=[],
        type=peer_list,
        help=f"add peers with Redis to each round: all ({', '.join(PEERS)}) or those "
        "named, comma-separated (needs `make peers-deps`)",
    )
    parser.add_argument(
        "--peers-python",
        default=str(BENCH.parent / ".venv-peers" / "bin" / "python"),
        help="the Python of the venv that has the peers",
    )
    args = parser.parse_args()
    if args.peers and not Path(args.peers_python).exists():
        parser.error(f"--peers: no {args.peers_python}; run `make peers-deps` first")
    skipped = ""
    try:
        if "postgres" in args.stores:
            skipped = pg.problem(durable=True)
            if skipped:
                print(f"postgres: not measured: {skipped}", file=sys.stderr)
                args.stores = [s for s in args.stores if s != "postgres"]
        report = run(args)
    finally:
        pg.stop()
    if skipped:
        report["postgres_skipped"] = skipped
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
