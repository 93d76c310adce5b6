"""What every RPC handler of the master shares: a request context that the
logs carry, the one place where errors become gRPC statuses, the one place
RPC latency is measured, and the count of open streams.

The handlers are coroutines (or async generators, for streams) of servicers
that hold the ``MasterRuntime`` as ``_rt``; all of them run on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from taskfleet.common.errors import InvalidArgument, TaskfleetError, status_for
from taskfleet.common.logs import bound_context, new_request_id

if TYPE_CHECKING:  # the stubs' generic does not exist at run time
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.aio.ServerInterceptor

log = logging.getLogger("taskfleet.master.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
UnaryHandler = Callable[[Any, Req, Context], Awaitable[Resp]]
StreamHandler = Callable[[Any, Req, Context], AsyncGenerator[Resp, None]]


async def _abort(context: Context, exc: BaseException, method: str) -> None:
    code, message = status_for(exc)
    if not isinstance(exc, TaskfleetError):
        log.exception("%s failed", method)
    else:
        log.debug("%s refused: %s", method, message)
    await context.abort(code, message)


def unary(method: UnaryHandler[Req, Resp]) -> UnaryHandler[Req, Resp]:
    """Run a unary handler with a request context and mapped errors."""

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: Context) -> Resp:
        started = time.perf_counter()
        code = "OK"
        with bound_context(request_id=new_request_id(), peer=context.peer()):
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc)[0].name
                await _abort(context, exc, method.__name__)
                raise  # unreachable: abort raises
            finally:
                self._rt.metrics.rpc(method.__name__, code, time.perf_counter() - started)

    return handler


def streaming(method: StreamHandler[Req, Resp]) -> StreamHandler[Req, Resp]:
    """Like ``unary`` for handlers that return a response stream; each open
    stream counts against ``--max-streams``."""

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: Context) -> AsyncGenerator[Resp, None]:
        started = time.perf_counter()
        code = "OK"
        counted = False
        with bound_context(request_id=new_request_id(), peer=context.peer()):
            try:
                self._rt.open_stream()
                counted = True
                async with contextlib.aclosing(method(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except (GeneratorExit, asyncio.CancelledError):  # the call ended first
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc)[0].name
                await _abort(context, exc, method.__name__)
            finally:
                if counted:
                    self._rt.close_stream()
                self._rt.metrics.rpc(method.__name__, code, time.perf_counter() - started)

    return handler


class DecodeRequests(ServerInterceptor):
    """Parses requests inside the handler, so one that is not a valid message is
    refused with INVALID_ARGUMENT; gRPC's own parsing would answer INTERNAL."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
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

    async def decoded(requests: AsyncIterable[bytes]) -> AsyncIterator[Any]:
        async for data in requests:
            yield decode(data)

    async def decode_stream(requests: AsyncIterable[bytes], context: Context) -> Any:
        return decoded(requests)  # a bad message ends the stream when it is read

    async def decode_one(data: bytes, context: Context) -> Any:
        try:
            return decode(data)
        except InvalidArgument as exc:
            await context.abort(exc.code, str(exc))

    kind = "_".join(
        "stream" if streams else "unary"
        for streams in (handler.request_streaming, handler.response_streaming)
    )
    convert = decode_stream if handler.request_streaming else decode_one
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        _after(convert, getattr(handler, kind)), response_serializer=handler.response_serializer
    )


def _after(convert: Callable[[Any, Context], Awaitable[Any]], behavior: Any) -> Any:
    """``behavior`` applied to what ``convert`` makes of the raw request, of the same
    kind (async generator or coroutine), since gRPC serves the two differently."""
    if inspect.isasyncgenfunction(behavior):

        async def responses(raw: Any, context: Context) -> AsyncIterator[Any]:
            request = await convert(raw, context)
            async with contextlib.aclosing(behavior(request, context)) as inner:
                async for response in inner:
                    yield response

        return responses

    async def response(raw: Any, context: Context) -> Any:
        return await behavior(await convert(raw, context), context)

    return response
