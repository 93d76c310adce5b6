"""Observability, end to end with real processes: the gRPC health service and
server reflection, Prometheus metrics of master and worker, and JSON logs that
carry the request or task they belong to."""

from __future__ import annotations

import json
import secrets
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from taskfleet.common.client import task_result
from taskfleet.common.model import TaskState
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

from procs import Gates, MasterProc, WorkerProc, free_port, poll

WAIT_S = 60.0
SERVICES = ("taskfleet.v1.TaskService", "taskfleet.v1.WorkerService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RUN_TOTAL = "taskfleet_worker_tasks_run_total"

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
        return {s.name for s in response.list_services_response.service}


def scrape(address: str) -> Samples:
    """Every sample at http://ADDRESS/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def json_lines(output: str) -> Iterator[dict[str, Any]]:
    for line in output.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


def metrics_flag() -> tuple[str, list[str]]:
    address = f"127.0.0.1:{free_port()}"
    return address, ["--metrics-listen", address]


# -- health and reflection -----------------------------------------------------


def test_health_is_serving_then_not_serving_while_the_master_drains(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str, gates: Gates
) -> None:
    # Given a master that drains for up to 30 s, and a worker running a task for it
    master = start_master(extra=["--drain-s", "30"])
    start_worker(master, queues=queue_name)
    gate = gates.new("drain")
    with master.client() as client:
        running = client.submit("block_until", [gate], queue=queue_name)
    poll(lambda: Gates.started(gate, 1), WAIT_S, "the task to start")

    # Then every service is SERVING, overall and by name
    for service in ("", *SERVICES):
        assert health_status(master.address, service) == SERVING

    # When it gets SIGTERM while a WaitTasks stream waits on the running task
    # and a client watches its health
    with grpc.insecure_channel(master.address) as channel:
        waiting = tasks_pb2_grpc.TaskServiceStub(channel).WaitTasks(
            tasks_pb2.WaitTasksRequest(task_ids=[running]), timeout=WAIT_S
        )
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=WAIT_S
        )
        assert next(watch).status == SERVING
        master.signal(signal.SIGTERM)

        # Then health checks say NOT_SERVING while it drains
        poll(
            lambda: health_status(master.address) == NOT_SERVING,
            WAIT_S,
            "health to say NOT_SERVING",
        )
        for service in SERVICES:
            assert health_status(master.address, service) == NOT_SERVING
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        assert master.popen.poll() is None

        # and once the running task ends, its result still reaches the waiter,
        # and the master exits cleanly
        gates.open(gate)
        (finished,) = list(waiting)
        assert finished.state == TaskState.SUCCEEDED
    assert master.wait(WAIT_S) == 0


def test_reflection_lists_the_services(master: MasterProc) -> None:
    assert listed_services(master.address) >= {
        *SERVICES,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_health_and_reflection_need_no_token(start_master: StartMaster) -> None:
    # Given a master that requires a token
    token = f"secret-{secrets.token_hex(8)}"
    master = start_master(extra=["--token", token], client_auth={"token": token})

    # Then health and reflection answer callers without one
    assert health_status(master.address) == SERVING
    assert "taskfleet.v1.TaskService" in listed_services(master.address)
    # while taskfleet's own services still refuse them
    with grpc.insecure_channel(master.address) as channel, pytest.raises(grpc.RpcError) as info:
        tasks_pb2_grpc.TaskServiceStub(channel).GetStats(tasks_pb2.GetStatsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- metrics -------------------------------------------------------------------


def test_metrics_of_master_and_worker(
    start_master: StartMaster,
    start_worker: StartWorker,
    queue_name: str,
    gates: Gates,
    tmp_path: Path,
) -> None:
    # Given a master and a worker that both serve metrics
    master_metrics, master_flags = metrics_flag()
    worker_metrics, worker_flags = metrics_flag()
    master = start_master(extra=master_flags)
    worker = start_worker(master, queues=queue_name, extra=worker_flags)
    q = queue_name

    # When it runs tasks that succeed, fail, succeed on a retry, and get cancelled
    gate = gates.new("cancelled")
    with master.client() as client:
        squares = [client.submit("square", [n], queue=q) for n in range(3)]
        failing = client.submit("boom", ["no"], queue=q)
        flaky = client.submit("flaky", [str(tmp_path), 1], queue=q, max_attempts=2)
        blocked = client.submit("block_until", [gate], queue=q)
        poll(lambda: Gates.started(gate, 1), WAIT_S, "the blocking task to start")
        poll(
            lambda: sample(scrape(worker_metrics), "taskfleet_worker_busy_slots") == 1,
            WAIT_S,
            "the worker to report a busy slot",
        )
        client.cancel(blocked)
        done = {t.id: t for t in client.wait([*squares, failing, flaky], timeout_s=WAIT_S)}
        assert [task_result(done[i]) for i in squares] == [0, 1, 4]
        assert done[failing].state == TaskState.FAILED
        assert task_result(done[flaky]) == 2
    gates.open(gate)  # the cancelled task's thread runs on until its function returns

    # Then the master counts them by queue and task name
    m = scrape(master_metrics)
    for name, task, value in [
        ("taskfleet_tasks_submitted_total", "square", 3),
        ("taskfleet_tasks_submitted_total", "boom", 1),
        ("taskfleet_tasks_succeeded_total", "square", 3),
        ("taskfleet_tasks_succeeded_total", "flaky", 1),
        ("taskfleet_tasks_failed_total", "boom", 1),
        ("taskfleet_tasks_retried_total", "flaky", 1),
        ("taskfleet_tasks_cancelled_total", "block_until", 1),
    ]:
        assert sample(m, name, queue=q, task=task) == value, (name, task)
    # and reads the queue depth by state from the store
    depth = {
        state.name.lower(): sample(m, "taskfleet_queue_depth", queue=q, state=state.name.lower())
        for state in TaskState
    }
    assert depth == {"pending": 0, "running": 0, "succeeded": 4, "failed": 1, "cancelled": 1}
    assert sample(m, "taskfleet_workers_connected") == 1
    # and times every RPC by method and status code
    assert (sample(m, "taskfleet_rpc_duration_seconds_count", method="Submit", code="OK") or 0) >= 6
    assert sample(m, "taskfleet_rpc_duration_seconds_count", method="CancelTask", code="OK") == 1
    assert sample(
        m, "taskfleet_rpc_duration_seconds_bucket", method="Submit", code="OK", le="+Inf"
    ) == sample(m, "taskfleet_rpc_duration_seconds_count", method="Submit", code="OK")

    # and the worker counts attempts by task and outcome, with their run times
    def settled() -> Samples | None:
        w = scrape(worker_metrics)
        reported = sample(w, RUN_TOTAL, task="block_until", outcome="cancelled")
        return w if reported and sample(w, "taskfleet_worker_busy_slots") == 0 else None

    w = poll(settled, WAIT_S, "the worker to report the cancel and go idle")
    for task, outcome, value in [
        ("square", "succeeded", 3),
        ("boom", "failed", 1),
        ("flaky", "retried", 1),
        ("flaky", "succeeded", 1),
        ("block_until", "cancelled", 1),
    ]:
        assert sample(w, RUN_TOTAL, task=task, outcome=outcome) == value
    assert sample(w, "taskfleet_worker_task_run_seconds_count", task="square") == 3
    assert sample(w, "taskfleet_worker_task_run_seconds_bucket", task="square", le="+Inf") == 3
    assert sample(w, "taskfleet_worker_slots") == 2
    assert worker.popen.poll() is None


def test_lease_expiries_are_counted(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str, gates: Gates
) -> None:
    # Given a worker running a task for a master that serves metrics
    address, flags = metrics_flag()
    master = start_master(extra=flags)
    worker = start_worker(master, queues=queue_name)
    gate = gates.new("lapse")
    with master.client() as client:
        client.submit("block_until", [gate], queue=queue_name)
    poll(lambda: Gates.started(gate, 1), WAIT_S, "the task to start")

    # When the worker is killed, so its lease lapses
    worker.kill()

    # Then the master counts the expiry, by queue and task
    def expiries() -> float | None:
        labels = {"queue": queue_name, "task": "block_until"}
        return sample(scrape(address), "taskfleet_lost_leases_total", **labels)

    assert poll(expiries, WAIT_S, "the lease expiry to be counted") == 1


def test_lost_leases_past_the_cap_count_as_failed_and_pruned_tasks_are_counted(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str, gates: Gates
) -> None:
    # Given a master that fails a task at its first lost lease and keeps results briefly
    address, flags = metrics_flag()
    master = start_master(extra=[*flags, "--max-lost-leases", "0", "--result-ttl-s", "0.5"])
    worker = start_worker(master, queues=queue_name)
    gate = gates.new("lost")
    with master.client() as client:
        task_id = client.submit("block_until", [gate], queue=queue_name)
        poll(lambda: Gates.started(gate, 1), WAIT_S, "the task to start")

        # When its worker is killed
        worker.kill()

        # Then the task ends FAILED WorkerLost, counted as failed, and is pruned later
        (task,) = client.wait([task_id], timeout_s=WAIT_S)
        assert task.error is not None and task.error.type == "WorkerLost"
    labels = {"queue": queue_name, "task": "block_until"}
    assert sample(scrape(address), "taskfleet_tasks_failed_total", **labels) == 1
    assert (
        poll(lambda: sample(scrape(address), "taskfleet_tasks_pruned_total"), WAIT_S, "the prune")
        == 1
    )


# -- logs ----------------------------------------------------------------------


def test_json_logs_carry_the_request_and_the_task(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a master and a worker logging JSON, with a worker token each must keep secret
    worker_token = f"wtoken-{secrets.token_hex(8)}"
    master = start_master(
        extra=["--log-format", "json", "--log-level", "debug", "--worker-token", worker_token]
    )
    worker = start_worker(
        master, queues=queue_name, extra=["--log-format", "json", "--token", worker_token]
    )

    # When a task fails for good
    with master.client() as client:
        failing = client.submit("boom", ["kaput"], queue=queue_name)
        (task,) = client.wait([failing], timeout_s=WAIT_S)
        assert task.state == TaskState.FAILED

    # Then the master's lines about the Submit call carry its request id and peer
    def submit_line() -> dict[str, Any] | None:
        return next(
            (
                line
                for line in json_lines(master.output())
                if line["message"].startswith("submitted 1 task")
            ),
            None,
        )

    line = poll(submit_line, WAIT_S, "the master to log the submit")
    assert line["request_id"] and line["peer"].startswith("ipv4:127.0.0.1:")

    # and the worker's line about the failure carries the task id and attempt
    def failure_line() -> dict[str, Any] | None:
        return next(
            (line for line in json_lines(worker.output()) if line.get("task_id") == failing),
            None,
        )

    line = poll(failure_line, WAIT_S, "the worker to log the failure")
    assert line["attempt"] == "1" and line["level"] == "WARNING"
    assert "boom" in line["message"] and "kaput" in line["message"]

    # and neither process ever logs the token
    assert worker.stop() == 0
    assert master.stop() == 0
    assert worker_token not in master.output() + worker.output()
