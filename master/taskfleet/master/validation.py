"""Checks on what producers submit, so bad input is refused with a message
naming the field before it reaches the store, and on the results workers send,
so the master never stores bytes it would later hand out as broken JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from taskfleet.common.batching import metadata_bytes
from taskfleet.common.codec import decode_args, loads
from taskfleet.common.errors import InvalidArgument, ResourceExhausted
from taskfleet.common.model import (
    JSON,
    MAX_DURATION_S,
    MAX_UNIX_S,
    Outcome,
    TaskError,
    TaskSpec,
    TaskState,
)

MAX_NAME_CHARS = 200
MAX_BATCH = 10_000


def validate_specs(specs: Sequence[TaskSpec], max_payload_bytes: int) -> None:
    """Raise InvalidArgument or ResourceExhausted for the first bad spec."""
    if not specs:
        raise InvalidArgument("tasks: submit at least one task")
    if len(specs) > MAX_BATCH:
        raise ResourceExhausted(f"tasks: at most {MAX_BATCH} tasks per Submit, got {len(specs)}")
    for i, spec in enumerate(specs):
        _validate_spec(f"tasks[{i}]", spec, max_payload_bytes)
        if spec.depends_on or spec.pass_results or spec.gather_results:
            _validate_depends_on(f"tasks[{i}]", i, spec)


def _validate_spec(field: str, spec: TaskSpec, max_payload_bytes: int) -> None:
    if not spec.name.strip():
        raise InvalidArgument(f"{field}.name: must not be empty")
    if len(spec.name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field}.name: longer than {MAX_NAME_CHARS} characters")
    if len(spec.queue) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field}.queue: longer than {MAX_NAME_CHARS} characters")
    if len(spec.payload) > max_payload_bytes:
        raise ResourceExhausted(
            f"{field}.payload: {len(spec.payload)} bytes is over the limit of {max_payload_bytes}; "
            "put large data on shared storage and pass its path or URL instead"
        )
    # Metadata travels with the payload in every message that carries the task.
    total_bytes = len(spec.payload) + metadata_bytes(spec.metadata)
    if total_bytes > max_payload_bytes:
        raise ResourceExhausted(
            f"{field}.metadata: payload plus metadata keys and values are {total_bytes} bytes, "
            f"over the limit of {max_payload_bytes}; keep metadata to small tags"
        )
    if spec.content_type == JSON:
        try:
            decode_args(spec.payload, spec.content_type)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}.{exc}") from None
    if spec.max_attempts < 0:
        raise InvalidArgument(f"{field}.max_attempts: must not be negative")
    if spec.timeout_s < 0:
        raise InvalidArgument(f"{field}.timeout: must not be negative")
    if spec.timeout_s > MAX_DURATION_S:
        raise InvalidArgument(f"{field}.timeout: longer than {MAX_DURATION_S} s")
    if spec.result_ttl_s < 0:
        raise InvalidArgument(f"{field}.result_ttl: must not be negative")
    if spec.result_ttl_s > MAX_DURATION_S:
        raise InvalidArgument(f"{field}.result_ttl: longer than {MAX_DURATION_S} s")
    if spec.not_before < 0:
        raise InvalidArgument(f"{field}.not_before: must not be before 1970")
    if spec.not_before > MAX_UNIX_S:
        raise InvalidArgument(f"{field}.not_before: must not be after 9999-12-31")
    if len(spec.concurrency_key) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field}.concurrency_key: longer than {MAX_NAME_CHARS} characters")
    if spec.concurrency_key and spec.concurrency_limit < 1:
        raise InvalidArgument(f"{field}.concurrency_limit: must be at least 1 with a key")
    if spec.concurrency_limit and not spec.concurrency_key:
        raise InvalidArgument(f"{field}.concurrency_key: must be set with concurrency_limit")


def _validate_depends_on(field: str, index: int, spec: TaskSpec) -> None:
    """``$N`` must name an earlier spec of the same request, so a request can never
    hold a cycle; ids are checked by the store, which knows them."""
    for option, on in (
        ("pass_results", spec.pass_results),
        ("gather_results", spec.gather_results),
    ):
        if on and spec.content_type != JSON:
            raise InvalidArgument(f"{field}.{option}: needs content_type {JSON}")
    if spec.pass_results and spec.gather_results:
        raise InvalidArgument(
            f"{field}.gather_results: set pass_results or gather_results, not both"
        )
    if len(spec.depends_on) > MAX_BATCH:
        raise InvalidArgument(f"{field}.depends_on: at most {MAX_BATCH} parents")
    for j, parent in enumerate(spec.depends_on):
        where = f"{field}.depends_on[{j}]"
        if not parent.startswith("$"):
            if not parent.strip():
                raise InvalidArgument(f"{where}: must not be empty")
            continue
        number = parent[1:]
        if not number.isdigit() or not number.isascii():
            raise InvalidArgument(f"{where}: {parent!r} is neither a task id nor $N")
        if int(number) >= index:
            raise InvalidArgument(
                f"{where}: {parent} must name an earlier task of this request "
                f"($0 to ${index - 1}); a task cannot depend on itself or a later one"
                if index
                else f"{where}: {parent} must name an earlier task of this request, "
                "and this is the first"
            )


def checked_outcome(outcome: Outcome) -> Outcome:
    """``outcome``, or a final ``ResultNotSerializable`` failure in its place when
    its JSON result is not standard JSON (NaN or Infinity from a worker not
    written in Python, say): Python's own workers refuse such a result the same
    way, and running the task again would give the same bytes. A negative
    retry delay counts as none (the master's backoff applies)."""
    if outcome.retry_delay_s < 0:
        outcome = dataclasses.replace(outcome, retry_delay_s=0.0)
    if outcome.state is not TaskState.SUCCEEDED or outcome.result_content_type != JSON:
        return outcome
    if not outcome.result:
        return outcome  # an empty result reads as null
    try:
        loads(outcome.result, "result")
    except InvalidArgument as exc:
        error = TaskError(
            "ResultNotSerializable", f"the master refused the result the worker sent: {exc}"
        )
        return Outcome(outcome.ref, TaskState.FAILED, error=error)
    return outcome
