"""The plainest client of taskfleet: the stubs generated from protos/ and nothing else.

What a service in any other language starts from (the issue's "client generated
from protos/ alone"): one insecure channel, the TaskService stub, JSON payloads
written by hand. None of taskfleet's own client code runs here (no failover
channel, no retries, no conversion to the model), so the figures taken through it
are what the master and workers cost such a client.

- ``per_task_stream``: W1s. Submit in batches of 1,000 (as ``Client.submit_many``
  cuts them), then one ``WaitTasks`` over every id: the stream that sends one
  message per task, which the simplest client reads.
- ``submit_and_wait``: one task, ``SubmitAndWait``, read until the task comes back.
- ``submit_then_wait``: one task, ``Submit``, then ``WaitTasks`` for its id.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc

from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

SUBMIT_BATCH = 1_000
SUCCEEDED = tasks_pb2.TASK_STATE_SUCCEEDED


def spec(name: str, args: tuple[Any, ...]) -> tasks_pb2.TaskSpec:
    """A TaskSpec as the proto's comments describe it: a JSON payload of args and kwargs."""
    payload = json.dumps({"args": list(args), "kwargs": {}}).encode()
    return tasks_pb2.TaskSpec(name=name, payload=payload, content_type="application/json")


class RawClient:
    """A channel and a stub; every call is one RPC, nothing retried."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = tasks_pb2_grpc.TaskServiceStub(self.channel)

    def per_task_stream(self, items: list[tuple[str, tuple[Any, ...]]]) -> float:
        """Submit every item, then read one WaitTasks message per task; seconds taken."""
        start = time.perf_counter()
        ids: list[str] = []
        for first in range(0, len(items), SUBMIT_BATCH):
            batch = [spec(*item) for item in items[first : first + SUBMIT_BATCH]]
            ids.extend(self.stub.Submit(tasks_pb2.SubmitRequest(tasks=batch)).task_ids)
        done = sum(
            task.state == SUCCEEDED
            for task in self.stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=ids))
        )
        elapsed = time.perf_counter() - start
        assert done == len(items), f"only {done} of {len(items)} succeeded"
        return elapsed

    def submit_and_wait(self, item: tuple[str, tuple[Any, ...]]) -> float:
        """One task through SubmitAndWait: the first message carries its id, a later
        one the finished task."""
        start = time.perf_counter()
        request = tasks_pb2.SubmitAndWaitRequest(tasks=[spec(*item)])
        finished = [task for reply in self.stub.SubmitAndWait(request) for task in reply.tasks]
        elapsed = time.perf_counter() - start
        assert [task.state for task in finished] == [SUCCEEDED], finished
        return elapsed

    def submit_then_wait(self, item: tuple[str, tuple[Any, ...]]) -> float:
        """One task through Submit, then WaitTasks on its id: two calls."""
        start = time.perf_counter()
        ids = self.stub.Submit(tasks_pb2.SubmitRequest(tasks=[spec(*item)])).task_ids
        finished = list(self.stub.WaitTasks(tasks_pb2.WaitTasksRequest(task_ids=ids)))
        elapsed = time.perf_counter() - start
        assert [task.state for task in finished] == [SUCCEEDED], finished
        return elapsed

    def close(self) -> None:
        self.channel.close()
