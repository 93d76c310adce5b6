"""What every RPC handler of the master shares: a thread-local request context
that the logs carry, and the one place where errors become gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from taskfleet.common.context import bound_context, new_request_id
from taskfleet.common.errors import TaskfleetError, status_for

log = logging.getLogger("taskfleet.master.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.ServicerContext], Resp]


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_for(exc)
    if not isinstance(exc, TaskfleetError):
        log.exception("%s failed", method)
    else:
        log.debug("%s refused: %s", method, message)
    context.abort(code, message)


def unary(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run a unary handler with a request context and mapped errors."""

    @functools.wraps(method)
    def handler(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        with bound_context(request_id=new_request_id(), peer=context.peer()):
            try:
                return method(self, request, context)
            except Exception as exc:
                _abort(context, exc, method.__name__)
                raise  # unreachable: abort raises

    return handler


def streaming(
    method: Handler[Req, Iterator[Resp]],
) -> Handler[Req, Iterator[Resp]]:
    """Like ``unary`` for handlers that return a response stream.

    The context is bound only while the generator runs, since gRPC resumes it
    on whichever of its threads is free.
    """

    @functools.wraps(method)
    def handler(self: Any, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        fields = {"request_id": new_request_id(), "peer": context.peer()}
        try:
            with bound_context(**fields):
                responses = method(self, request, context)
            while True:
                with bound_context(**fields):
                    response = next(responses, None)
                if response is None:
                    return
                yield response
        except Exception as exc:
            with bound_context(**fields):
                _abort(context, exc, method.__name__)

    return handler
