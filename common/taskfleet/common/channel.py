"""The one factory for gRPC channels: keepalive, message size limits, auth; and
the channel of a client that fails over between masters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import grpc.experimental

from taskfleet.common.addresses import AddressRing
from taskfleet.common.tls import ClientTls

StubT = TypeVar("StubT")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Keepalive pings find a dead or stalled connection even when no call is
# active; the master's server options allow pings this often.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    # gRPC waits longer after each failed connect (up to 120 s by default); a
    # client that resumes a wait across a restart of the master should see it
    # back within seconds of its return.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# A blocking client's streams from the master (SubmitAndWait, WaitTasks) are read
# on the calling thread rather than handed over by gRPC's channel-spin thread:
# a thread switch less per message, about a fifth less client CPU per wait.
# Still interruptible by Ctrl-C, and cancellable from another thread.
SYNC_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # gRPC sets SO_REUSEPORT by default: a second master on a taken address would
    # then start without error and silently share the port with the first.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]


if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class _BearerToken(_UnaryUnary, _UnaryStream, _StreamStream):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "_BearerToken(***)"

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._with_token(details), requests)


def open_channel(target: str, token: str = "", *, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to the master at ``target`` (HOST:PORT) that sends ``token`` if set,
    over TLS when ``tls`` is given."""
    if tls is None:
        channel = grpc.insecure_channel(target, options=SYNC_CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(target, tls.credentials(), options=SYNC_CHANNEL_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


@dataclass(eq=False)
class Link(Generic[StubT]):
    """A channel to one master of the ring, with its stub and the calls using it."""

    address: str
    channel: grpc.Channel
    stub: StubT
    calls: int = 0


class FailoverChannel(Generic[StubT]):
    """One channel at a time, to the current master of ``masters``.

    A call borrows the current link (``use``); one that finds its master gone
    calls ``move_on``, and the calls after it go to the next master on a fresh
    channel, which dials at once (an old one waits out gRPC's reconnect
    backoff). The old channel closes when the last call on it ends: closing it
    earlier would cut calls still running on it.
    """

    def __init__(
        self,
        masters: AddressRing,
        make_stub: Callable[[grpc.Channel], StubT],
        token: str = "",
        *,
        tls: ClientTls | None = None,
    ) -> None:
        self.masters = masters
        self._make_stub = make_stub
        self._token = token
        self._tls = tls
        self._lock = threading.Lock()
        self._link = self._open(masters.current)

    def _open(self, address: str) -> Link[StubT]:
        channel = open_channel(address, self._token, tls=self._tls)
        return Link(address, channel, self._make_stub(channel))

    @contextmanager
    def use(self) -> Iterator[Link[StubT]]:
        """The current link, held open for as long as the ``with`` block runs."""
        with self._lock:
            link = self._link
            link.calls += 1
        try:
            yield link
        finally:
            with self._lock:
                link.calls -= 1
                stale = link is not self._link and not link.calls
            if stale:
                link.channel.close()

    def move_on(self, link: Link[StubT]) -> None:
        """After a call on ``link`` found its master unavailable: send the next calls
        to the next master (once, however many calls on ``link`` failed)."""
        with self._lock:
            if link is not self._link:
                return
            address = self.masters.move_on(link.address)
            if address == link.address:  # a ring of one keeps its channel
                return
            self._link = self._open(address)
            stale = not link.calls
        if stale:
            link.channel.close()

    def close(self) -> None:
        with self._lock:
            self._link.channel.close()
