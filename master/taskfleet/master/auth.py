"""Bearer-token check on every RPC: the master's one server interceptor."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from taskfleet.master.rpc import ServerInterceptor

# Only taskfleet's own services are guarded: the standard health and reflection
# services stay open so load balancers and grpcurl work without a token.
GUARDED_PREFIX = "/taskfleet.v1."
WORKER_PREFIX = "/taskfleet.v1.WorkerService/"


class TokenInterceptor(ServerInterceptor):
    """Refuses taskfleet calls without the right ``authorization: Bearer <token>``
    with UNAUTHENTICATED.

    With a ``worker_token``, WorkerService calls need it and TaskService calls
    need ``token`` (none at all if ``token`` is empty); without one, every call
    needs ``token``.
    """

    def __init__(self, token: str, worker_token: str = "") -> None:
        self._producer = _header(token) if token else None
        self._worker = _header(worker_token) if worker_token else self._producer
        self._separate = bool(worker_token)

    def __repr__(self) -> str:  # never show the token
        return "TokenInterceptor(***)"

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method or ""
        if not method.startswith(GUARDED_PREFIX):
            return await continuation(handler_call_details)
        is_worker_call = method.startswith(WORKER_PREFIX)
        expected = self._worker if is_worker_call else self._producer
        if expected is None:
            return await continuation(handler_call_details)
        presented = [
            value.encode() if isinstance(value, str) else value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization"
        ]
        if any(hmac.compare_digest(value, expected) for value in presented):
            return await continuation(handler_call_details)
        if not presented:
            message = "missing bearer token: this master requires authorization: Bearer <token>"
        elif self._separate:
            which = "worker token" if is_worker_call else "producer token (--token)"
            message = f"wrong bearer token: this call needs the master's {which}"
        else:
            message = "wrong bearer token"
        return _refusal(await continuation(handler_call_details), message)


def _header(token: str) -> bytes:
    return f"Bearer {token}".encode()


def _refusal(handler: Any, message: str) -> Any:
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
