"""The worker's connection to the master: one stream at a time, opened with a
Hello, read until it ends, and opened again with the one reconnect policy, to
the next master of ``--master``'s list when it has several.

``Connection.run`` is the ``connection`` thread. It reads what the master
sends and hands it, as plain Jobs, LeaseRefs and sequence numbers, to its
``Peer`` (the worker). Other threads send through ``outbox``, the queue the
current stream's request iterator reads; between streams it is None, and the
next Hello carries the leases instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from taskfleet.common import convert
from taskfleet.common.addresses import AddressRing, parse_address_list
from taskfleet.common.channel import open_channel
from taskfleet.common.config import WorkerConfig
from taskfleet.common.errors import (
    InvalidArgument,
    TaskfleetError,
    Unauthenticated,
    from_rpc_error,
)
from taskfleet.common.model import LeaseRef
from taskfleet.common.reconnect import first_reconnect_s, reconnect_policy
from taskfleet.v1 import worker_pb2, worker_pb2_grpc
from taskfleet.worker import messages
from taskfleet.worker.batches import Batch
from taskfleet.worker.execute import Job
from taskfleet.worker.registry import TaskDefinition

log = logging.getLogger("taskfleet.worker")

CONNECT_TIMEOUT_S = 5.0  # how long to wait for the master's Welcome
SILENCE_HEARTBEATS = 3  # heartbeat intervals without a word before the stream counts as dead

Outbox = queue.SimpleQueue[worker_pb2.WorkerMessage | None]


class StreamEnded(Exception):
    """The stream to the master ended; the worker reconnects."""


class Peer(Protocol):
    """What the connection needs of the worker it serves."""

    def greeting(self) -> tuple[list[LeaseRef], list[Batch]]:
        """The leases to name in the Hello and the batches to send again.
        Called with the lock held."""

    def connected(self) -> None:
        """A new stream is up. Called with the lock held."""

    def ack(self, seq: int) -> None:
        """The master recorded the Results batches up to ``seq``."""

    def accept(self, jobs: list[Job]) -> None:
        """The master leased ``jobs`` to this worker."""

    def revoke(self, refs: list[LeaseRef]) -> None:
        """The master cancelled these leases, or they lapsed."""


class Connection:
    """The stream to the master, with ``lock`` (the worker's) guarding
    ``outbox`` and ``stream``."""

    def __init__(
        self,
        config: WorkerConfig,
        worker_id: str,
        registry: dict[str, TaskDefinition],
        lock: threading.Condition,
        peer: Peer,
        stopped: threading.Event,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.registry = registry
        self.masters = AddressRing(parse_address_list("--master", config.master))
        self._lock = lock
        self._peer = peer
        self._stopped = stopped  # set when the worker stops: no more reconnects
        self.outbox: Outbox | None = None
        self.stream: grpc.CallIterator[worker_pb2.MasterMessage] | None = None
        self.heartbeat_s = 2.0  # until the master's Welcome says otherwise
        self.last_heard = time.monotonic()  # when the master last sent anything
        self.refused: TaskfleetError | None = None  # the master refuses this worker

    def _dial(self) -> grpc.Channel:
        """The channel for the next attempt to connect: the one place that says
        which master to call."""
        return open_channel(self.masters.current, self.config.token, tls=self.config.tls)

    def run(self) -> None:
        """Connect, serve, reconnect, until the worker stops or the master refuses
        it for good (then ``refused`` says why)."""
        while not self._stopped.is_set():
            retrying = reconnect_policy(
                _worth_retrying, lambda exc: self._move_on("unreachable", _rpc_reason(exc))
            )
            try:
                retrying(self._serve_stream)
            except grpc.RpcError as exc:  # not retried: refused for good
                self.refused = from_rpc_error(exc)
                return
            except StreamEnded as exc:
                if not self._stopped.is_set():
                    self._move_on("lost", str(exc))
                    self._stopped.wait(first_reconnect_s())

    def _move_on(self, what: str, reason: str) -> None:
        """After a failed dial or a lost stream, dial the next master of the list."""
        failed = self.masters.current
        following = self.masters.move_on(failed)
        log.warning("master %s %s (%s); reconnecting to %s", failed, what, reason, following)

    def send(self, message: worker_pb2.WorkerMessage | None) -> None:
        """Send on the current stream, if there is one; None closes it."""
        with self._lock:
            outbox = self.outbox
        if outbox is not None:
            outbox.put(message)

    def check_alive(self) -> None:
        """Cancel a stream the master has gone silent on (it answers every heartbeat),
        so that ``run`` reconnects. Called with the lock held."""
        silent_s = time.monotonic() - self.last_heard
        if self.stream is not None and silent_s > SILENCE_HEARTBEATS * self.heartbeat_s:
            log.warning("master silent for %.1f s; dropping the connection", silent_s)
            self.stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
            self.stream = None

    def _serve_stream(self) -> None:
        """One stream: raises RpcError if it never got going, StreamEnded once it had."""
        outbox: Outbox = queue.SimpleQueue()
        with self._lock:
            held, resend = self._peer.greeting()
            hello = messages.hello(self.worker_id, self.config, sorted(self.registry), held)
        channel = self._dial()
        try:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            responses = stub.Connect(_requests(hello, outbox))
            # A master that accepts the connection but never answers (a stalled
            # proxy) must not hold the worker: give up on it after a while.
            give_up = threading.Timer(CONNECT_TIMEOUT_S, responses.cancel)
            give_up.start()
            try:
                # The first response raises RpcError when the master is not there.
                welcome = next(iter(responses), None)
            finally:
                give_up.cancel()
            if welcome is None or welcome.WhichOneof("kind") != "welcome":
                raise StreamEnded("master closed the stream before welcoming this worker")
            self.heartbeat_s = convert.seconds_from_duration(welcome.welcome.heartbeat_interval)
            with self._lock:
                self.outbox = outbox
                self.stream = responses
                self.last_heard = time.monotonic()
                self._peer.connected()
                self._lock.notify_all()
            for batch in resend:
                outbox.put(messages.results(*batch))
            log.info("connected to master %s", self.masters.current)
            try:
                for message in responses:
                    self.last_heard = time.monotonic()
                    self._apply(message)
            except grpc.RpcError as exc:
                raise StreamEnded(_rpc_reason(exc)) from None
            raise StreamEnded("master closed the stream")
        finally:
            with self._lock:
                if self.outbox is outbox:
                    self.outbox = None
                    self.stream = None
            outbox.put(None)
            channel.close()

    def _apply(self, message: worker_pb2.MasterMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignments":
            assignments = message.assignments
            if assignments.results_ack:
                self._peer.ack(assignments.results_ack)
            self._peer.accept([messages.job(a, self.registry) for a in assignments.assignments])
        elif kind == "revoke":
            self._peer.revoke([convert.ref_from_proto(r) for r in message.revoke.leases])
        elif kind == "results_ack":
            self._peer.ack(message.results_ack.seq)


def _requests(
    hello: worker_pb2.WorkerMessage, outbox: Outbox
) -> Iterator[worker_pb2.WorkerMessage]:
    yield hello
    while (message := outbox.get()) is not None:
        yield message


def _worth_retrying(exc: BaseException) -> bool:
    """A master that is down or restarting comes back; a wrong token or a Hello the
    master rejects stays wrong however often it is sent."""
    if not isinstance(exc, grpc.RpcError):
        return False
    return not isinstance(from_rpc_error(exc), Unauthenticated | InvalidArgument)


def _rpc_reason(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.RpcError):
        error = from_rpc_error(exc)
        return f"{type(error).__name__}: {error}"
    return repr(exc)
