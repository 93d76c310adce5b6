"""Address lists: workers, the Python client and the CLI given ``A,B`` fail over
from a master that is down or killed to the next one.

The masters here use memory stores, so each holds its own tasks: what a test
checks is which master a worker or client reaches, and that work goes on there.
Masters sharing one PostgreSQL database are tested in test_multimaster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from taskfleet.client import AsyncClient
from taskfleet.common.addresses import AddressRing, parse_address_list
from taskfleet.common.client import Client, make_spec
from taskfleet.common.errors import ConfigError, Unavailable
from taskfleet.common.model import TaskState

import pg
from procs import Gates, MasterProc, WorkerProc, free_port, poll
from test_cli import EXIT_USAGE, ok, refused, run

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


def connected_to(master: MasterProc, worker: WorkerProc) -> bool:
    """Whether ``master`` lists ``worker`` among its connected workers."""
    with master.client() as client:
        return any(w.pid == worker.pid for w in client.stats().workers)


def closed_address() -> str:
    """A loopback address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


# -- the list and the ring, without a network ---------------------------------------


def test_a_list_is_split_and_each_address_checked() -> None:
    assert parse_address_list("--master", "a:1, b:2") == ("a:1", "b:2")
    assert parse_address_list("--master", "[::1]:50051") == ("[::1]:50051",)
    for bad, words in [
        ("a:1,,b:2", "empty address"),
        ("a:1,", "empty address"),
        ("a:1,a:1", "a:1 is given twice"),
        ("a:1,nonsense", "expected HOST:PORT, got 'nonsense'"),
        ("a:1,b:99999", "expected HOST:PORT"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_address_list("--master", bad)
        assert str(caught.value).startswith("--master: "), caught.value
        assert words in str(caught.value), caught.value


def test_the_ring_moves_round_and_once_per_failure() -> None:
    ring = AddressRing(("a:1", "b:2", "c:3"))
    assert (ring.current, str(ring)) == ("a:1", "a:1,b:2,c:3")
    # Two calls that failed on a:1 together move the ring once.
    assert ring.move_on("a:1") == "b:2"
    assert ring.move_on("a:1") == "b:2"
    assert ring.move_on("b:2") == "c:3"
    # Round the ring: the first master, maybe restarted, is tried again.
    assert ring.move_on("c:3") == "a:1"
    assert AddressRing(("a:1",)).move_on("a:1") == "a:1"


def test_the_client_refuses_a_bad_list_naming_its_argument() -> None:
    with pytest.raises(ConfigError, match=r"^master: 127\.0\.0\.1:1 is given twice"):
        Client("127.0.0.1:1,127.0.0.1:1")


# -- workers ----------------------------------------------------------------------


def test_worker_moves_to_the_next_master_when_its_master_is_killed_mid_run(
    start_master: StartMaster, start_worker: StartWorker, gates: Gates
) -> None:
    # Given masters A and B, and a worker given A,B that runs a task from A
    a, b = start_master(), start_master()
    worker = start_worker(f"{a.address},{b.address}")
    assert connected_to(a, worker) and not connected_to(b, worker)
    gate = gates.new("held")
    with a.client() as client:
        client.submit("block_until", [gate])
    poll(lambda: Gates.started(gate, 1), 20, "the task from A to start")

    # When A is killed, and the task finishes while its master is gone
    a.kill()
    Gates.open(gate)

    # Then the worker connects to B, and tasks submitted to B run there: the
    # result for A, resent to B (which knows nothing of it), holds nothing up
    poll(lambda: connected_to(b, worker), 20, "the worker to reach B")
    with b.client() as client:
        assert client.run("square", [7], timeout_s=20) == 49
        ids = client.submit_many(make_spec("square", [n]) for n in range(20))
        assert [client.result(i, timeout_s=20) for i in ids] == [n * n for n in range(20)]
    assert "reconnecting to " + b.address in worker.output()
    assert worker.popen.poll() is None


def test_worker_given_a_master_that_was_never_up_connects_to_the_next(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Given master B, and A an address nothing listens on
    b = start_master()
    masters = f"{closed_address()},{b.address}"

    # When a worker is given A,B
    worker = start_worker(masters, wait_connected=False)

    # Then it serves B, and names the list it was given
    poll(lambda: connected_to(b, worker), 20, "the worker to reach B")
    with b.client() as client:
        assert client.run("square", [6], timeout_s=20) == 36
    assert f"serving {masters}" in worker.output()


def test_a_master_restarting_on_its_address_is_found_again_round_the_list(
    start_master: StartMaster, start_worker: StartWorker, gates: Gates, tmp_path: Path
) -> None:
    # Given a SQLite master A, and B an address nothing listens on; a worker and a
    # client given A,B, the client waiting for a task the worker runs
    db = tmp_path / "a.db"
    a = start_master(store=f"sqlite:{db}")
    masters = f"{a.address},{closed_address()}"
    worker = start_worker(masters)
    gate = gates.new("held")
    with Client(masters) as client:
        task_id = client.submit("block_until", [gate])
        poll(lambda: Gates.started(gate, 1), 20, "the task to start")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.result, task_id, 60)

            # When A is killed and restarts on the same address and file
            a.kill()
            a = start_master(store=f"sqlite:{db}", port=a.port)
            Gates.open(gate)

            # Then the worker, having tried B, comes back to A; and so does the
            # wait, which ends with the task's result
            poll(lambda: connected_to(a, worker), 20, "the worker to reach A again")
            assert waiting.result(timeout=60) == "released"
        assert client.run("square", [8], timeout_s=20) == 64


# -- the Python client -------------------------------------------------------------


def test_client_with_the_first_master_down_answers_from_the_next(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Given master B with a worker, and A an address nothing listens on
    b = start_master()
    start_worker(b)
    with Client(f"{closed_address()},{b.address}") as client:
        # Then a submit without an idempotency key (it never reached A, so
        # sending it again is safe), a SubmitAndWait and a read all go to B
        task_id = client.submit("square", [4])
        assert client.result(task_id, timeout_s=20) == 16
        assert client.run("square", [5], timeout_s=20) == 25
        assert client.masters.current == b.address
    with b.client() as direct:
        assert direct.get(task_id).state == TaskState.SUCCEEDED


def test_client_moves_on_when_its_master_is_killed_between_calls(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Given masters A and B, each with a worker of its own, and a client given A,B
    a, b = start_master(), start_master()
    worker_a, worker_b = start_worker(a), start_worker(b)
    with Client(f"{a.address},{b.address}") as client:
        assert [w.pid for w in client.stats().workers] == [worker_a.pid]

        # When A is killed
        a.kill()

        # Then the next calls are answered by B
        assert [w.pid for w in client.stats().workers] == [worker_b.pid]
        assert client.run("square", [9], timeout_s=20) == 81
        assert client.result(client.submit("square", [3]), timeout_s=20) == 9


def bytes_unread_at(port: int) -> int:
    """Bytes the kernel holds for established connections to ``port`` that the
    process listening there has not read (gRPC may listen on an IPv6 socket
    that takes IPv4 too)."""
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            _, local, _, state, queues, *_ = line.split()
            if state == "01" and int(local.rpartition(":")[2], 16) == port:
                unread += int(queues.partition(":")[2], 16)
    return unread


@pytest.mark.parametrize("keyed", [False, True])
def test_a_submit_cut_off_after_it_was_sent_is_sent_again_only_with_a_key(
    start_master: StartMaster, queue_name: str, keyed: bool
) -> None:
    # Given a client given A,B that has reached A, and A frozen
    a, b = start_master(), start_master()
    big = "x" * 50_000
    with Client(f"{a.address},{b.address}") as client:
        client.stats()
        a.freeze()

        # When a submit reaches A's socket and A is then killed, so the client
        # cannot tell whether A stored the task
        with ThreadPoolExecutor(1) as pool:
            submitting = pool.submit(
                client.submit,
                "length",
                [big],
                queue=queue_name,
                idempotency_key="k-1" if keyed else "",
            )
            poll(lambda: bytes_unread_at(a.port) > len(big), 20, "the submit to reach A")
            a.kill()

            # Then without an idempotency key the client says so instead of
            # sending it to B, where it could make a second task; with one it
            # goes to B, where the key keeps it single
            if keyed:
                task_id = submitting.result(timeout=30)
                with b.client() as direct:
                    assert direct.get(task_id).spec.idempotency_key == "k-1"
            else:
                with pytest.raises(Unavailable):
                    submitting.result(timeout=30)
        assert client.masters.current == b.address
        with b.client() as direct:
            queued = sum(q.counts.get(TaskState.PENDING, 0) for q in direct.stats().queues)
        assert queued == (1 if keyed else 0)


# -- masters on one PostgreSQL database -----------------------------------------------


@pytest.fixture
def db() -> Iterator[str]:
    with pg.database() as url:
        yield url


def serving_master(client: Client, worker: WorkerProc) -> str | None:
    """The address of the master ``worker`` is connected to, as the shared
    database has it."""
    stats = client.stats()
    listen = {m.master_id: m.listen for m in stats.masters}
    return next((listen.get(w.master_id) for w in stats.workers if w.pid == worker.pid), None)


def test_on_one_database_a_killed_master_loses_nothing(
    db: str, start_master: StartMaster, start_worker: StartWorker, gates: Gates
) -> None:
    # Given masters A and B on one database, a worker and a client given A,B,
    # and the worker running two tasks it took from A
    a, b = start_master(store=db), start_master(store=db)
    masters = f"{a.address},{b.address}"
    worker = start_worker(masters)
    held_gates = [gates.new("held-1"), gates.new("held-2")]
    with Client(masters) as client:
        assert serving_master(client, worker) == a.address
        held = [client.submit("block_until", [gate]) for gate in held_gates]
        poll(lambda: all(Gates.started(g, 1) for g in held_gates), 20, "both tasks to start")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: {t.id: t for t in client.wait(held, timeout_s=60)})

            # When A is killed, and the tasks finish with A gone
            a.kill()
            Gates.open(*held_gates)

            # Then the worker serves B, its results land there, and the wait
            # that was on A ends on B with both tasks
            finished = waiting.result(timeout=60)
        assert [finished[i].state for i in held] == [TaskState.SUCCEEDED] * 2
        poll(lambda: serving_master(client, worker) == b.address, 20, "the worker to serve B")
        ids = client.submit_many(make_spec("square", [n]) for n in range(20))
        assert [client.result(i, timeout_s=30) for i in ids] == [n * n for n in range(20)]
    # And the database holds each task once, final once
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
    assert rows == [(int(TaskState.SUCCEEDED), 22)]


# -- the command line --------------------------------------------------------------


def test_cli_with_the_first_master_down_uses_the_next(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Given master B with a worker, and A an address nothing listens on
    b = start_master()
    worker = start_worker(b, tasks="taskfleet.worker.examples")
    masters = f"{closed_address()},{b.address}"

    # Then commands given A,B (by flag or environment) are served by B
    assert ok(run("submit", "square", "7", "--wait", "--master", masters)) == "49\n"
    assert f"-{worker.pid}-" in ok(run("stats", env={"TASKFLEET_MASTER": masters}))


def test_cli_with_every_master_down_names_the_list() -> None:
    masters = f"{closed_address()},{closed_address()}"
    line = refused(run("stats", "--master", masters), "cannot reach any master of", masters)
    assert line.startswith("taskfleet stats: error: "), line


@pytest.mark.parametrize(
    ("masters", "words"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", "empty address"),
        ("127.0.0.1:1,127.0.0.1:1", "given twice"),
        ("127.0.0.1:1,nonsense", "HOST:PORT"),
    ],
)
def test_cli_refuses_a_bad_list_in_one_line_naming_master(masters: str, words: str) -> None:
    refused(run("stats", "--master", masters), "--master", words, code=EXIT_USAGE)
    refused(run("get", "x", env={"TASKFLEET_MASTER": masters}), "--master", words, code=EXIT_USAGE)
    worker = run("worker", "--tasks", "e2etasks", "--master", masters)
    refused(worker, "--master", words, code=EXIT_USAGE)


def test_a_manager_worker_takes_one_address() -> None:
    proc = run(
        "worker", "--transport", "manager", "--authkey", "k", "--manager-task", "square",
        "--tasks", "e2etasks", "--master", "127.0.0.1:1,127.0.0.1:2",
    )  # fmt: skip
    refused(proc, "--master", "one HOST:PORT with --transport manager", code=EXIT_USAGE)


def test_async_client_fails_over_as_the_blocking_one_does(
    start_master: StartMaster, start_worker: StartWorker
) -> None:
    # Given masters A and B with a worker each, and B alone behind a closed address
    a, b = start_master(), start_master()
    worker_a, worker_b = start_worker(a), start_worker(b)

    async def main() -> None:
        async with AsyncClient(f"{closed_address()},{b.address}") as client:
            assert await client.run("square", [5], timeout_s=20) == 25
            handle = await client.submit("square", [4])
            assert await handle.result(timeout_s=20) == 16
        async with AsyncClient(f"{a.address},{b.address}") as client:
            assert [w.pid for w in (await client.stats()).workers] == [worker_a.pid]
            a.kill()  # when A is killed, the next calls are answered by B
            assert [w.pid for w in (await client.stats()).workers] == [worker_b.pid]
            assert await client.run("square", [9], timeout_s=20) == 81

    asyncio.run(main())
