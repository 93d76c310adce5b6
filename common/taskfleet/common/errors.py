"""The one error tree of taskfleet, and its mapping to gRPC status codes.

Servers raise these; ``status_for`` maps them to a status in exactly one place,
and ``from_rpc_error`` turns a status back into the same class on the client.
"""

from __future__ import annotations

from typing import Any

import grpc


class TaskfleetError(Exception):
    """Base of every error taskfleet raises on purpose."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(TaskfleetError):
    """A request field is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TaskfleetError):
    """The task (or other named thing) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(TaskfleetError):
    """A payload or queue limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TaskfleetError):
    """The request is valid but the task's state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(TaskfleetError):
    """The caller's token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(TaskfleetError):
    """The master cannot be reached (or is shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(Unavailable):
    """The master's database cannot be reached; calls work again once it answers."""


class DeadlineExceeded(TaskfleetError):
    """A call or a wait ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreUnusable(TaskfleetError):
    """The master's store file is damaged or unreadable; an operator must restore it."""

    code = grpc.StatusCode.DATA_LOSS


class ConfigError(TaskfleetError):
    """A flag, environment variable or store URL is invalid."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TaskFailed(TaskfleetError):
    """A task ended FAILED (or CANCELLED: see ``TaskCancelled``); raised by clients
    that wait for a result. ``type``, ``message`` and ``remote_traceback`` are
    the task's own error, as the worker reported it."""

    def __init__(
        self, task_id: str, state: str, error_type: str, message: str, remote_traceback: str = ""
    ) -> None:
        super().__init__(f"task {task_id} {state}: {error_type}: {message}")
        self.task_id = task_id
        self.state = state
        self.error_type = error_type
        self.error_message = message
        self.remote_traceback = remote_traceback

    @property
    def type(self) -> str:
        return self.error_type

    @property
    def message(self) -> str:
        return self.error_message


class TaskCancelled(TaskFailed):
    """A task ended CANCELLED. A TaskFailed, so code that catches failures alone
    still sees cancels."""


_BY_CODE: dict[grpc.StatusCode, type[TaskfleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        StoreUnusable,
    )
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a server sends for ``exc``."""
    if isinstance(exc, TaskfleetError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def from_rpc_error(exc: grpc.RpcError) -> TaskfleetError:
    """The taskfleet error a failed call stands for, for clients to raise."""
    call: Any = exc  # every RpcError a call raises is also a grpc.Call
    try:
        code, details = call.code(), call.details()
    except AttributeError:
        code, details = grpc.StatusCode.UNKNOWN, str(exc)
    cls = _BY_CODE.get(code, TaskfleetError)
    return cls(details or code.name)
