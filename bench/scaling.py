"""``make bench-scaling``: one master against two on one PostgreSQL database.

The same two workers and the same W1 batch of no-op tasks each round: first
with both workers on one master and one client submitting everything, then
with one worker and one client on each of two masters (each client submits
half and waits for its half). On a machine of few cores every process shares
them, so this measures what a second master costs or brings here, not how
masters on their own machines scale; docs/scaling.md says what to expect there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from measuring import free_port, poll

from taskfleet.common.client import Client, make_spec

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent / "tests"))
import pg  # noqa: E402

PY = sys.executable
QUIET = ["--log-level", "WARNING"]


class Masters:
    """``count`` masters on ``store`` and two workers spread over them."""

    def __init__(self, store: str, count: int) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        for address in self.addresses:
            self._start("taskfleet.master", "--listen", address, "--store", store)
        self.clients = [Client(address) for address in self.addresses]
        for client in self.clients:
            poll(lambda client=client: _answers(client), "master")
        for i in range(2):
            master = self.addresses[i % count]
            self._start(
                "taskfleet.worker", "--master", master, "--tasks", "taskfleet.worker.examples"
            )
        poll(lambda: len(self.clients[0].stats().workers) == 2, "workers")
        self.run(200)  # warm up: pools started, code paths hot

    def _start(self, module: str, *args: str) -> None:
        self._procs.append(
            subprocess.Popen([PY, "-m", module, *args, *QUIET], stdout=subprocess.DEVNULL)
        )

    def run(self, tasks: int) -> float:
        """Tasks per second for ``tasks`` no-op tasks, split over the masters' clients."""
        share = tasks // len(self.clients)
        errors: list[BaseException] = []

        def produce(client: Client) -> None:
            try:
                ids = client.submit_many(make_spec("noop") for _ in range(share))
                done = sum(1 for _ in client.wait(ids))
                assert done == share, f"only {done} of {share} finished"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(c,)) for c in self.clients]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return share * len(self.clients) / elapsed

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in reversed(self._procs):  # workers first: they finish with a master
            proc.terminate()
            proc.wait(30)


def _answers(client: Client) -> bool:
    try:
        client.stats()
        return True
    except Exception:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--w1", type=int, default=10_000, help="no-op tasks per round")
    args = parser.parse_args()
    figures: dict[int, list[float]] = {1: [], 2: []}
    with ExitStack() as stack:
        stack.callback(pg.stop)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for round_number in range(args.rounds):
            for count in (1, 2):
                store = stack.enter_context(pg.store_url("postgres", tmp, durable=True))
                masters = Masters(store, count)
                try:
                    figures[count].append(masters.run(args.w1))
                finally:
                    masters.close()
            print(
                f"round {round_number + 1}: one master {figures[1][-1]:,.0f}/s, "
                f"two masters {figures[2][-1]:,.0f}/s",
                flush=True,
            )
    one, two = (statistics.median(figures[n]) for n in (1, 2))
    print(f"W1 {args.w1:,} no-op tasks/s, median of {args.rounds} rounds, 2 workers:")
    print(f"  one master   {one:>8,.0f}")
    print(f"  two masters  {two:>8,.0f}  ({two / one:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
