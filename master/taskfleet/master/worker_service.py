"""WorkerService: one long-lived stream per worker.

Two threads serve a stream: gRPC's own runs the response generator, which
leases tasks whenever the worker has credit and sends what the session's
outbox holds; a reader thread applies what the worker sends (credit,
heartbeats, results, releases). Tasks and results travel in batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from taskfleet.common import convert
from taskfleet.common.context import bound_context, current_context
from taskfleet.common.errors import InvalidArgument, StoreUnusable, Unavailable
from taskfleet.common.model import Lease, LeaseRef, Outcome, TaskState, WorkerInfo
from taskfleet.common.result_limit import limit_outcome
from taskfleet.master.rpc import streaming
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.sessions import WorkerSession
from taskfleet.master.validation import checked_outcome
from taskfleet.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("taskfleet.master.workers")

MAX_LEASE_BATCH = 500
IDLE_RECHECK_S = 1.0  # safety net: recheck the store even if no wake-up came
_OUTCOME_STATES = {int(s) for s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)}


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime

    @streaming
    def Connect(
        self, request_iterator: Iterator[worker_pb2.WorkerMessage], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.MasterMessage]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello: the first message of a worker stream must be Hello")
        if self._rt.stopping.is_set():
            # UNAVAILABLE, not a welcome: the worker backs off and reconnects elsewhere
            # or to the next master, instead of holding this one for its whole grace.
            raise Unavailable("master is shutting down")
        session = WorkerSession(_worker_info(first.hello, context.peer()))
        self._rt.sessions.add(session)
        if self._rt.stopping.is_set():
            session.close()  # stop() began after the check above; its close_all may miss us
        context.add_callback(session.close)
        log.info(
            "worker %s connected from %s: queues=%s concurrency=%d",
            session.info.worker_id,
            session.info.peer,
            ",".join(session.info.queues),
            session.info.concurrency,
        )
        try:
            yield worker_pb2.MasterMessage(
                welcome=worker_pb2.Welcome(
                    heartbeat_interval=convert.duration(self._rt.config.heartbeat_s),
                    lease_duration=convert.duration(self._rt.config.lease_s),
                )
            )
            held = [convert.ref_from_proto(r) for r in first.hello.held]
            self._renew(session, held)
            reader = threading.Thread(
                target=self._read,
                args=(session, request_iterator, current_context()),
                name=f"worker-reader-{session.info.worker_id}",
                daemon=True,
            )
            reader.start()
            yield from self._dispatch(session)
        finally:
            self._rt.sessions.remove(session)
            log.info("worker %s disconnected", session.info.worker_id)

    def _dispatch(self, session: WorkerSession) -> Iterator[worker_pb2.MasterMessage]:
        """Yield outbox messages and lease batches until the session closes.

        An acknowledgement of results rides on the assignments that answer the
        same batch's credit, so a busy worker gets one message per batch."""
        info = session.info
        names = info.task_names or None
        while True:
            with session.cond:
                while not (
                    session.closed
                    or session.outbox
                    or session.results_ack
                    or self._may_lease(session)
                ):
                    session.cond.wait(self._idle_wait_s(session))
                    if session.credit > 0:
                        session.work_hint = True  # the wait ran out: look again
                    if time.monotonic() - session.last_heard > self._rt.config.lease_s:
                        # A stalled connection that TCP has not noticed: end the
                        # stream, so the worker reconnects and stats stop listing it.
                        log.warning("worker %s silent for a whole lease; closing", info.worker_id)
                        session.closed = True
                if session.closed:
                    return
                outbox, session.outbox = session.outbox, []
                results_ack, session.results_ack = session.results_ack, 0
                want = min(session.credit, MAX_LEASE_BATCH) if self._may_lease(session) else 0
                session.work_hint = False
            yield from outbox
            leases = (
                self._rt.lifecycle.lease(
                    info.worker_id, info.queues, names, want, self._rt.config.lease_s
                )
                if want
                else []
            )
            if leases:
                with session.cond:
                    session.credit -= len(leases)
                    session.running += len(leases)
                    if len(leases) == want:
                        session.work_hint = True
                yield from self._deliver(leases, results_ack)
            elif results_ack:
                yield worker_pb2.MasterMessage(results_ack=worker_pb2.ResultsAck(seq=results_ack))

    def _deliver(self, leases: list[Lease], results_ack: int) -> Iterator[worker_pb2.MasterMessage]:
        """The messages handing ``leases`` over, cut by bytes. gRPC resumes this
        generator only once a message went out; the tasks of messages that did
        not (the stream broke first) never reached the worker, so they go back
        at once with their attempts not counted, instead of when the lease lapses."""
        messages = convert.assignments_to_proto(leases, results_ack)
        sent = 0
        try:
            for message in messages:
                yield message
                sent += 1
        finally:
            if sent < len(messages):
                unsent = [
                    convert.ref_from_proto(a.lease)
                    for m in messages[sent:]
                    for a in m.assignments.assignments
                ]
                self._give_back(unsent)

    def _give_back(self, refs: list[LeaseRef]) -> None:
        try:
            released = self._rt.lifecycle.release(refs)
        except Exception:  # runs when gRPC drops the stream, maybe as the store closes
            log.exception("could not give back %d undelivered leases", len(refs))
            return
        log.info("%d of %d undelivered leases given back", released, len(refs))

    def _may_lease(self, session: WorkerSession) -> bool:
        return session.credit > 0 and session.work_hint and not self._rt.stopping.is_set()

    def _idle_wait_s(self, session: WorkerSession) -> float:
        if session.credit <= 0:
            return min(IDLE_RECHECK_S * 5, self._rt.config.lease_s / 2)
        now = time.time()
        ready_at = self._rt.store.next_ready_at(now)
        if ready_at is None:
            return IDLE_RECHECK_S
        return max(0.001, min(IDLE_RECHECK_S, ready_at - now))

    def _read(
        self,
        session: WorkerSession,
        request_iterator: Iterator[worker_pb2.WorkerMessage],
        context_fields: dict[str, str],
    ) -> None:
        with bound_context(**context_fields, worker=session.info.worker_id):
            try:
                for message in request_iterator:
                    self._apply(session, message)
            except grpc.RpcError:
                pass  # the stream ended: cancelled by the worker or cut off
            except StoreUnusable:
                pass  # the store has said so once, and health says NOT_SERVING
            except Exception:
                log.exception("worker stream failed")
            finally:
                session.close()

    def _apply(self, session: WorkerSession, message: worker_pb2.WorkerMessage) -> None:
        session.last_heard = time.monotonic()
        kind = message.WhichOneof("kind")
        if kind == "credit":
            if message.credit.tasks > 0:
                session.add_credit(message.credit.tasks)
        elif kind == "heartbeat":
            held = self._renew(session, [convert.ref_from_proto(r) for r in message.heartbeat.held])
            session.send(worker_pb2.MasterMessage(heartbeat_ack=worker_pb2.HeartbeatAck(held=held)))
        elif kind == "results":
            self._record(session, message.results)
        elif kind == "release":
            refs = [convert.ref_from_proto(r) for r in message.release.leases]
            released = self._rt.lifecycle.release(refs)
            with session.cond:
                session.running = max(0, session.running - released)
        else:
            log.warning("ignoring unexpected %s message from worker", kind)

    def _renew(self, session: WorkerSession, held: list[LeaseRef]) -> int:
        """Extend the worker's valid leases, revoke the rest; returns how many hold."""
        stale = self._rt.lifecycle.extend(session.info.worker_id, held, self._rt.config.lease_s)
        with session.cond:
            session.running = len(held) - len(stale)
        if stale:
            session.revoke(stale)
        return len(held) - len(stale)

    def _record(self, session: WorkerSession, results: worker_pb2.Results) -> None:
        outcomes: list[Outcome] = []
        for pb in results.outcomes:
            if pb.state not in _OUTCOME_STATES:
                log.warning("ignoring outcome of %s with state %d", pb.lease.task_id, pb.state)
                continue
            try:
                outcome = checked_outcome(convert.outcome_from_proto(pb))
            except InvalidArgument as exc:
                log.warning("ignoring outcome of %s: %s", pb.lease.task_id, exc)
                continue
            outcomes.append(limit_outcome(outcome, self._rt.config.max_result_bytes))
        self._rt.lifecycle.record(outcomes)
        with session.cond:
            session.running = max(0, session.running - len(results.outcomes))
        session.ack_results(results.seq, max(0, results.credit))


def _worker_info(hello: worker_pb2.Hello, peer: str) -> WorkerInfo:
    if not hello.worker_id:
        raise InvalidArgument("hello.worker_id: must not be empty")
    if not hello.queues:
        raise InvalidArgument("hello.queues: name at least one queue")
    if hello.concurrency < 1:
        raise InvalidArgument("hello.concurrency: must be at least 1")
    return WorkerInfo(
        worker_id=hello.worker_id,
        hostname=hello.hostname,
        pid=hello.pid,
        queues=tuple(hello.queues),
        task_names=tuple(hello.task_names),
        concurrency=hello.concurrency,
        running=0,
        peer=peer,
        connected_at=time.time(),
    )
