"""What every RPC handler of the master shares: a thread-local request context
that the logs carry, the one place where errors become gRPC statuses, and the
one place RPC latency is measured.

The handlers are methods of servicers that hold the ``MasterRuntime`` as ``_rt``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from taskfleet.common.context import bound_context, new_request_id
from taskfleet.common.errors import InvalidArgument, TaskfleetError, status_for

if TYPE_CHECKING:  # the stubs' generic does not exist at run time
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor

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
        started = time.perf_counter()
        code = "OK"
        with bound_context(request_id=new_request_id(), peer=context.peer()):
            try:
                return method(self, request, context)
            except Exception as exc:
                code = status_for(exc)[0].name
                _abort(context, exc, method.__name__)
                raise  # unreachable: abort raises
            finally:
                self._rt.metrics.rpc(method.__name__, code, time.perf_counter() - started)

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
        started = time.perf_counter()
        code = "OK"
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
        except GeneratorExit:  # the call ended before the stream did
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_for(exc)[0].name
            with bound_context(**fields):
                _abort(context, exc, method.__name__)
        finally:
            self._rt.metrics.rpc(method.__name__, code, time.perf_counter() - started)

    return handler


class DecodeRequests(_ServerInterceptor):
    """Parses requests inside the handler, so one that is not a valid message is
    refused with INVALID_ARGUMENT; gRPC's own parsing would answer INTERNAL."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _decoding(handler, handler_call_details.method)


def _decoding(handler: Any, method: str) -> Any:
    """``handler`` taking raw bytes and parsing them with its own deserializer."""
    parse = handler.request_deserializer

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:
            raise InvalidArgument(f"request: not a valid message for {method}") from None

    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary

        def run_stream(requests: Iterable[bytes], context: grpc.ServicerContext) -> Any:
            return behavior((decode(data) for data in requests), context)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(run_stream, response_serializer=handler.response_serializer)

    behavior = handler.unary_stream or handler.unary_unary

    def run(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = decode(data)
        except InvalidArgument as exc:
            context.abort(exc.code, str(exc))
        return behavior(request, context)

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return factory(run, response_serializer=handler.response_serializer)
