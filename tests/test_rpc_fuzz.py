"""Malformed and random requests thrown at a live master.

Whatever a caller sends, each call must end with a status the caller can act
on: OK, or a refusal that names the problem. INTERNAL means the master hit a
bug, and a hung call (caught by the per-call deadline) means it wedged. After
the barrage the same master must still serve ordinary calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskfleet.common.channel import open_channel
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2

from procs import MasterProc

CALL_TIMEOUT_S = 5.0
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
LAST_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z


class Shown:
    """A request whose repr is cut short: a falsifying example can hold megabytes."""

    def __init__(self, message: Message) -> None:
        self.message: Any = message

    def __repr__(self) -> str:
        text = f"{type(self.message).__name__}({str(self.message).strip()})"
        return text if len(text) <= 1_000 else f"{text[:1_000]}... ({len(text)} chars)"


def shown(strategy: st.SearchStrategy[Message]) -> st.SearchStrategy[Shown]:
    return strategy.map(Shown)


def _methods() -> list[tuple[str, bool, bool]]:
    """(path, request_streaming, response_streaming) of every method the master serves."""
    methods = []
    for module, service in ((tasks_pb2, "TaskService"), (worker_pb2, "WorkerService")):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            methods.append((path, method.client_streaming, method.server_streaming))
    return methods


METHODS = _methods()


# strategies

huge_texts = st.builds(
    lambda char, n: char * n,
    st.characters(codec="utf-8"),
    st.sampled_from([201, 5_000, 300_000]),
)
texts = st.text(max_size=40) | st.sampled_from(["", " ", "\t\n", "\x00", "é" * 200]) | huge_texts
payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"{}",
            b'{"args": [1, 2], "kwargs": {"x": null}}',
            b'{"args": {}, "kwargs": []}',
            b'{"args": [], "other": 1}',
            b"[1, 2]",
            b"null",
            b'"\xff"',
            b'{"args": [' + b"9" * 10_000 + b"]}",  # more digits than int() takes
            b"\xef\xbb\xbf{}",
        ]
    ),
    # Deeper than the JSON parser recurses, yet within the size limit.
    st.sampled_from([b"[" * 100_000, b'{"args": ' * 50_000]),
    st.sampled_from([1 << 20, (1 << 20) + 1, 3 << 20]).map(lambda n: b" " * n),
)
content_types = st.sampled_from(["", "application/json", "text/plain", "x/y"]) | texts
# Half the draws from the edges: integers() alone mostly draws small values.
int32s = st.sampled_from([*INT32, -1, 0, 1]) | st.integers(*INT32)
int64s = st.sampled_from([*INT64, -1, 2**40, 2**62, LAST_TIMESTAMP_S + 1]) | st.integers(*INT64)
nanos = st.sampled_from([0, -1, 999_999_999, 1_000_000_000, *INT32]) | st.integers(*INT32)
durations = st.builds(Duration, seconds=int64s, nanos=nanos)
timestamps = st.builds(Timestamp, seconds=int64s, nanos=nanos)

# For each field: what a sane producer sends, and what a broken or hostile one might.
SANE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["add", "mul", "pkg.mod.task"]),
    "queue": st.sampled_from(["", "fuzz", "fuzz-other"]),
    "payload": st.sampled_from([b"", b'{"args": [1, 2], "kwargs": {}}']),
    "content_type": st.sampled_from(["", "application/json"]),
    "priority": st.integers(-5, 5),
    "max_attempts": st.integers(0, 5),
    "idempotency_key": st.sampled_from(["", "", "fuzz-key"]),
    "metadata": st.dictionaries(st.sampled_from(["a", "b"]), st.text(max_size=5), max_size=2),
    "timeout": st.none() | st.builds(Duration, seconds=st.integers(0, 3600)),
    "not_before": st.none() | st.builds(Timestamp, seconds=st.integers(0, 2**33)),
}
ODD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": texts,
    "queue": texts,
    "payload": payloads,
    "content_type": content_types,
    "priority": int32s,
    "max_attempts": int32s,
    "idempotency_key": texts,
    "metadata": st.dictionaries(texts, texts, max_size=3),
    "timeout": durations,
    "not_before": timestamps,
}


@st.composite
def task_specs(draw: st.DrawFn) -> tasks_pb2.TaskSpec:
    """A spec that is sane but for one to three odd fields, so the fuzzing reaches
    past the first check that refuses, into the store and back out."""
    odd = draw(st.sets(st.sampled_from(sorted(ODD_FIELDS)), min_size=1, max_size=3))
    fields = {
        name: draw(ODD_FIELDS[name] if name in odd else sane) for name, sane in SANE_FIELDS.items()
    }
    timeout, not_before = fields.pop("timeout"), fields.pop("not_before")
    spec = tasks_pb2.TaskSpec(**fields)
    if timeout is not None:
        spec.timeout.CopyFrom(timeout)
    if not_before is not None:
        spec.not_before.CopyFrom(not_before)
    return spec


submit_requests = shown(
    st.builds(
        lambda specs: tasks_pb2.SubmitRequest(tasks=specs),
        st.lists(task_specs(), min_size=1, max_size=3) | st.just([]),
    )
)
short_timeouts = st.one_of(  # waits that end at once or within 0.2 s
    st.builds(Duration, seconds=st.just(0), nanos=st.integers(0, 200_000_000)),
    st.builds(Duration, seconds=st.integers(INT64[0], -1), nanos=nanos),
    st.builds(Duration, seconds=st.just(0), nanos=st.integers(INT32[0], -1)),
)


def task_ids(known: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(known) | texts


# fixtures


@pytest.fixture(scope="module")
def fuzzed_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProc]:
    """One memory-store master that every test of this module fuzzes in turn."""
    master = MasterProc(Path(tmp_path_factory.mktemp("fuzz")))
    yield master
    master.kill()


@pytest.fixture(scope="module")
def channel(fuzzed_master: MasterProc) -> Iterator[grpc.Channel]:
    with open_channel(fuzzed_master.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> tasks_pb2_grpc.TaskServiceStub:
    return tasks_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture(scope="module")
def known_ids(stub: tasks_pb2_grpc.TaskServiceStub) -> list[str]:
    """Real task ids: one pending, one delayed for centuries, one cancelled (final)."""
    specs = [
        tasks_pb2.TaskSpec(name="add", queue="fuzz-known"),
        tasks_pb2.TaskSpec(name="add", queue="fuzz-known", not_before=Timestamp(seconds=2**33)),
        tasks_pb2.TaskSpec(name="add", queue="fuzz-known"),
    ]
    response = stub.Submit(tasks_pb2.SubmitRequest(tasks=specs), timeout=CALL_TIMEOUT_S)
    ids = list(response.task_ids)
    stub.CancelTask(tasks_pb2.CancelTaskRequest(task_id=ids[2]), timeout=CALL_TIMEOUT_S)
    return ids


# helpers


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run one call to its end (a stream to its last message) and say how it ended."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_acceptable(what: str, status: tuple[grpc.StatusCode, str]) -> None:
    code, details = status
    assert code in ACCEPTABLE, f"{what} ended {code.name}: {details[:500]}"


def assert_reads_back(stub: tasks_pb2_grpc.TaskServiceStub, task_id: str) -> None:
    """GetTask, WaitTasks and CancelTask of an accepted task all end acceptably."""
    get = tasks_pb2.GetTaskRequest(task_id=task_id)
    wait = tasks_pb2.WaitTasksRequest(task_ids=[task_id], timeout=Duration(nanos=1_000_000))
    cancel = tasks_pb2.CancelTaskRequest(task_id=task_id)

    assert_acceptable("GetTask", status_of(lambda: stub.GetTask(get, timeout=CALL_TIMEOUT_S)))
    assert_acceptable(
        "WaitTasks", status_of(lambda: list(stub.WaitTasks(wait, timeout=CALL_TIMEOUT_S)))
    )
    assert_acceptable(
        "CancelTask", status_of(lambda: stub.CancelTask(cancel, timeout=CALL_TIMEOUT_S))
    )


def raw_call(channel: grpc.Channel, method: tuple[str, bool, bool], body: bytes) -> object:
    """Send ``body`` as it is, decodable or not: no serializers on either side."""
    path, request_streaming, response_streaming = method
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    if request_streaming:
        return list(channel.stream_stream(path, **raw)(iter([body]), timeout=CALL_TIMEOUT_S))
    if response_streaming:
        return list(channel.unary_stream(path, **raw)(body, timeout=CALL_TIMEOUT_S))
    return channel.unary_unary(path, **raw)(body, timeout=CALL_TIMEOUT_S)


# fuzzing, method by method


@settings(FUZZ_SETTINGS, max_examples=80)
@given(request=submit_requests)
def test_submit_with_random_specs_is_accepted_or_refused(
    stub: tasks_pb2_grpc.TaskServiceStub, request: Shown
) -> None:
    submitted: list[str] = []

    def submit() -> None:
        submitted.extend(stub.Submit(request.message, timeout=CALL_TIMEOUT_S).task_ids)

    assert_acceptable("Submit", status_of(submit))

    # Whatever was accepted must also read back, stream out and cancel.
    for task_id in submitted:
        assert_reads_back(stub, task_id)


@FUZZ_SETTINGS
@given(data=st.data())
def test_get_and_cancel_with_random_ids(
    stub: tasks_pb2_grpc.TaskServiceStub, known_ids: list[str], data: st.DataObject
) -> None:
    get = data.draw(shown(task_ids(known_ids).map(lambda i: tasks_pb2.GetTaskRequest(task_id=i))))
    # Cancel only unknown ids and the cancelled task, keeping the live ones for the waits.
    cancel = data.draw(
        shown(task_ids(known_ids[2:]).map(lambda i: tasks_pb2.CancelTaskRequest(task_id=i)))
    )

    got = status_of(lambda: stub.GetTask(get.message, timeout=CALL_TIMEOUT_S))
    cancelled = status_of(lambda: stub.CancelTask(cancel.message, timeout=CALL_TIMEOUT_S))

    assert_acceptable("GetTask", got)
    assert_acceptable("CancelTask", cancelled)


@FUZZ_SETTINGS
@given(data=st.data())
def test_wait_with_random_ids_and_short_timeouts(
    stub: tasks_pb2_grpc.TaskServiceStub, known_ids: list[str], data: st.DataObject
) -> None:
    request = data.draw(
        shown(
            st.builds(
                lambda ids, timeout: tasks_pb2.WaitTasksRequest(task_ids=ids, timeout=timeout),
                st.lists(task_ids(known_ids), max_size=4),
                short_timeouts,
            )
        )
    )

    waited = status_of(lambda: list(stub.WaitTasks(request.message, timeout=CALL_TIMEOUT_S)))
    # The same fields, so the same bytes: the batched wait gets the very same request.
    same = tasks_pb2.WaitTasksBatchedRequest.FromString(request.message.SerializeToString())
    batched = status_of(lambda: list(stub.WaitTasksBatched(same, timeout=CALL_TIMEOUT_S)))

    assert_acceptable("WaitTasks", waited)
    assert_acceptable("WaitTasksBatched", batched)
    assert batched[0] == waited[0]


@FUZZ_SETTINGS
@given(request=shown(st.builds(tasks_pb2.WaitTasksRequest, task_ids=st.lists(texts))))
def test_wait_without_timeout_for_unknown_ids_is_refused_at_once(
    stub: tasks_pb2_grpc.TaskServiceStub, request: Shown
) -> None:
    waited = status_of(lambda: list(stub.WaitTasks(request.message, timeout=CALL_TIMEOUT_S)))

    assert waited[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), waited


@pytest.mark.parametrize("seconds", [10**6, 2**40, INT64[1]])
def test_wait_with_a_huge_timeout_waits_for_the_caller_deadline(
    stub: tasks_pb2_grpc.TaskServiceStub, known_ids: list[str], seconds: int
) -> None:
    request = tasks_pb2.WaitTasksRequest(task_ids=known_ids[:1], timeout=Duration(seconds=seconds))

    waited = status_of(lambda: list(stub.WaitTasks(request, timeout=0.3)))

    assert waited[0] is grpc.StatusCode.DEADLINE_EXCEEDED, waited


schedules = st.builds(
    tasks_pb2.Schedule,
    id=st.sampled_from(["", "fuzz"]) | texts,
    spec=task_specs(),
    cron=st.sampled_from(
        ["", "* * * * *", "0 0 29 2 *", "0 0 30 2 *", "* * * * * */2", "61 * * * *"]
    )
    | texts,
    interval=st.sampled_from(
        [Duration(), Duration(seconds=1), Duration(seconds=60), Duration(seconds=300_000_000_000)]
    )
    | durations,
    timezone=st.sampled_from(["", "UTC", "Europe/Berlin", "../etc", "Nowhere/x"]) | texts,
    paused=st.booleans(),
    next_fire=timestamps,
    missed_ticks=st.sampled_from([0, 1, 2, 3, -1]),
)


@FUZZ_SETTINGS
@given(schedule=shown(schedules))
def test_create_schedule_with_random_schedules_is_accepted_or_refused(
    stub: tasks_pb2_grpc.TaskServiceStub, schedule: Shown
) -> None:
    request = tasks_pb2.CreateScheduleRequest(schedule=schedule.message)
    created: list[str] = []

    def create() -> None:
        created.append(stub.CreateSchedule(request, timeout=CALL_TIMEOUT_S).id)

    assert_acceptable("CreateSchedule", status_of(create))
    # Whatever was accepted must also list, pause and delete.
    listing = tasks_pb2.ListSchedulesRequest()
    assert_acceptable(
        "ListSchedules", status_of(lambda: stub.ListSchedules(listing, timeout=CALL_TIMEOUT_S))
    )
    for schedule_id in created:
        pause = tasks_pb2.PauseScheduleRequest(id=schedule_id)
        assert_acceptable(
            "PauseSchedule",
            status_of(lambda p=pause: stub.PauseSchedule(p, timeout=CALL_TIMEOUT_S)),
        )
        delete = tasks_pb2.DeleteScheduleRequest(id=schedule_id)
        stub.DeleteSchedule(delete, timeout=CALL_TIMEOUT_S)


@FUZZ_SETTINGS
@given(method=st.sampled_from(METHODS), body=st.binary(max_size=512))
def test_raw_bytes_as_the_request_of_every_method(
    channel: grpc.Channel, method: tuple[str, bool, bool], body: bytes
) -> None:
    ended = status_of(lambda: raw_call(channel, method, body))

    assert_acceptable(f"{method[0]} with {body[:40]!r}", ended)


# afterwards


def test_the_master_still_serves_after_the_fuzzing(
    fuzzed_master: MasterProc, stub: tasks_pb2_grpc.TaskServiceStub
) -> None:
    spec = tasks_pb2.TaskSpec(name="add", queue="after-fuzz", payload=b'{"args": [1, 2]}')

    (task_id,) = stub.Submit(tasks_pb2.SubmitRequest(tasks=[spec]), timeout=CALL_TIMEOUT_S).task_ids
    task = stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), timeout=CALL_TIMEOUT_S)
    stats = stub.GetStats(tasks_pb2.GetStatsRequest(), timeout=CALL_TIMEOUT_S)

    assert fuzzed_master.popen.poll() is None, "the master exited"
    assert (task.id, task.state, task.spec.name) == (task_id, tasks_pb2.TASK_STATE_PENDING, "add")
    assert [(q.pending, q.running) for q in stats.queues if q.queue == "after-fuzz"] == [(1, 0)]
    assert "Traceback" not in fuzzed_master.output(), "the master logged an unexpected error"
