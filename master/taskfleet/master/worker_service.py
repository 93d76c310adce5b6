"""WorkerService: one long-lived stream per worker.

Two tasks on the event loop serve a stream, and no thread: the handler runs
the dispatcher, which leases tasks whenever the worker has credit and sends
what the session's outbox holds; a reader task applies what the worker sends
(credit, heartbeats, results, releases). Tasks and results travel in batches,
and each batch is one store call (on a thread, for a store whose calls block).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator

from taskfleet.common import convert
from taskfleet.common.errors import InvalidArgument, StoreUnavailable, StoreUnusable, Unavailable
from taskfleet.common.logs import bound_context
from taskfleet.common.model import Lease, LeaseRef, Outcome, Progress, TaskState, WorkerInfo
from taskfleet.common.result_limit import limit_outcome
from taskfleet.master.rpc import Context, streaming
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.sessions import WorkerSession
from taskfleet.master.validation import checked_outcome
from taskfleet.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("taskfleet.master.workers")

MAX_LEASE_BATCH = 500
IDLE_RECHECK_S = 1.0  # safety net: recheck the store even if no wake-up came
# How long the ack of an idle worker's results may wait for assignments to ride
# on (see _dispatch).
IDLE_ACK_DELAY_S = 0.02
_OUTCOME_STATES = {int(s) for s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)}


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, runtime: MasterRuntime) -> None:
        self._rt = runtime

    @streaming
    async def Connect(
        self, request_iterator: AsyncIterator[worker_pb2.WorkerMessage], context: Context
    ) -> AsyncGenerator[worker_pb2.MasterMessage, None]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello: the first message of a worker stream must be Hello")
        if self._rt.stopping.is_set():
            # UNAVAILABLE, not a welcome: the worker backs off and reconnects elsewhere
            # or to the next master, instead of holding this one for its whole grace.
            raise Unavailable("master is shutting down")
        if not self._rt.store_watch.available:
            # Refused before a session is made, so a worker retrying through an
            # outage costs no log lines; its held leases wait for the next try.
            raise StoreUnavailable(self._rt.store_watch.problem)
        session = WorkerSession(_worker_info(first.hello, context.peer(), self._rt.me.master_id))
        self._rt.sessions.add(session)
        log.info(
            "worker %s connected from %s: queues=%s concurrency=%d",
            session.info.worker_id,
            session.info.peer,
            ",".join(session.info.queues),
            session.info.concurrency,
        )
        reader: asyncio.Task[None] | None = None
        dispatcher = self._dispatch(session)
        try:
            yield worker_pb2.MasterMessage(
                welcome=worker_pb2.Welcome(
                    heartbeat_interval=convert.duration(self._rt.config.heartbeat_s),
                    lease_duration=convert.duration(self._rt.config.lease_s),
                )
            )
            held = [convert.ref_from_proto(r) for r in first.hello.held]
            await self._renew(session, held)
            reader = asyncio.create_task(self._read(session, request_iterator))
            async for message in dispatcher:
                yield message
            if session.failure is not None:
                raise session.failure
        finally:
            session.close()
            await dispatcher.aclose()  # now: it gives back what it could not deliver
            if reader is not None:
                reader.cancel()
            self._rt.sessions.remove(session)
            log.info("worker %s disconnected", session.info.worker_id)

    async def _dispatch(
        self, session: WorkerSession
    ) -> AsyncGenerator[worker_pb2.MasterMessage, None]:
        """Yield outbox messages and lease batches until the session closes.

        An acknowledgement of results rides on the assignments that answer the
        same batch's credit, so a busy worker gets one message per batch. A
        worker that holds no task (one task at a time, say) has nothing to send
        until it gets work, so its ack waits up to IDLE_ACK_DELAY_S to ride on
        that work's assignments: a message less per task for each side. A
        worker still running tasks is acked at once, as its next batch waits
        for the ack."""
        info = session.info
        names = info.task_names or None
        loop = asyncio.get_running_loop()
        ack_due: float | None = None  # when an idle worker's held-back ack must go
        while True:
            await self._wait_for_news(session, ack_due)
            if session.closed:
                if session.results_ack:  # held back: a draining worker waits for it
                    yield _results_ack(session.results_ack)
                return
            outbox, session.outbox = session.outbox, []
            results_ack, session.results_ack = session.results_ack, 0
            want = min(session.credit, MAX_LEASE_BATCH) if self._may_lease(session) else 0
            session.work_hint = False
            for message in outbox:
                yield message
            leases = (
                await self._rt.bridge.workers.run(
                    self._rt.lifecycle.lease,
                    info.worker_id,
                    info.queues,
                    names,
                    want,
                    self._rt.config.lease_s,
                )
                if want
                else []
            )
            if leases:
                session.credit -= len(leases)
                session.running += len(leases)
                if len(leases) == want:
                    session.work_hint = True
                # gRPC asks for the next message only once the last one went out;
                # the tasks of messages that did not (the stream broke first) never
                # reached the worker, so they go back at once with their attempts
                # not counted, instead of when the lease lapses.
                messages = convert.assignments_to_proto(leases, results_ack)
                sent = 0
                try:
                    for message in messages:
                        yield message
                        sent += 1
                finally:
                    if sent < len(messages):
                        self._give_back(leases, messages[sent:])
            elif results_ack:
                if session.running == 0 and not outbox and not self._rt.stopping.is_set():
                    if ack_due is None:
                        ack_due = loop.time() + IDLE_ACK_DELAY_S
                    if loop.time() < ack_due:
                        session.results_ack = max(session.results_ack, results_ack)
                        continue
                yield _results_ack(results_ack)
            if not session.results_ack:
                ack_due = None

    def _give_back(self, leases: list[Lease], unsent: list[worker_pb2.MasterMessage]) -> None:
        """Release the leases of ``unsent`` messages, in the background: this runs
        while the stream is being torn down."""
        refs = [convert.ref_from_proto(a.lease) for m in unsent for a in m.assignments.assignments]

        async def give_back() -> None:
            try:
                released = await self._rt.bridge.workers.run(self._rt.lifecycle.release, refs)
            except StoreUnavailable as exc:
                log.warning("%d undelivered leases will lapse instead: %s", len(refs), exc)
                return
            except Exception:  # maybe the store closes as the master stops
                log.exception("could not give back %d undelivered leases", len(refs))
                return
            log.info("%d of %d undelivered leases given back", released, len(refs))

        self._rt.bridge.spawn(give_back())

    async def _wait_for_news(self, session: WorkerSession, ack_due: float | None) -> None:
        """Until the session is closed, has something to send, or may lease; an
        ack held back until ``ack_due`` counts from then on."""
        loop = asyncio.get_running_loop()
        while True:
            session.changed.clear()  # before looking: a change from now on wakes us
            ack_wait_s = 0.0 if ack_due is None else ack_due - loop.time()
            if (
                session.closed
                or session.outbox
                or (session.results_ack and ack_wait_s <= 0)
                or self._may_lease(session)
            ):
                return
            wait_s = self._idle_wait_s(session)
            if session.results_ack:
                wait_s = min(wait_s, ack_wait_s)
            try:
                async with asyncio.timeout(wait_s):
                    await session.changed.wait()
            except TimeoutError:
                if session.results_ack and ack_due is not None and loop.time() >= ack_due:
                    return  # the held-back ack goes alone, without a look at the store
            if session.credit > 0:
                session.work_hint = True  # woken or the wait ran out: look again
            if time.monotonic() - session.last_heard > self._rt.config.lease_s:
                # A stalled connection that TCP has not noticed: end the
                # stream, so the worker reconnects and stats stop listing it.
                log.warning("worker %s silent for a whole lease; closing", session.info.worker_id)
                session.close()

    def _may_lease(self, session: WorkerSession) -> bool:
        return session.credit > 0 and session.work_hint and not self._rt.stopping.is_set()

    def _idle_wait_s(self, session: WorkerSession) -> float:
        """How long to sleep with no news: the recheck is a safety net for a missed
        wake-up (delayed tasks coming due wake workers through ``DueTimer``)."""
        if session.credit <= 0:
            return min(IDLE_RECHECK_S * 5, self._rt.config.lease_s / 2)
        # Jittered: streams opened together (workers reconnecting after a restart)
        # would otherwise all ask the store at the same instant, every time.
        return IDLE_RECHECK_S * random.uniform(0.5, 1.0)

    async def _read(
        self, session: WorkerSession, request_iterator: AsyncIterator[worker_pb2.WorkerMessage]
    ) -> None:
        with bound_context(worker=session.info.worker_id):
            try:
                async for message in request_iterator:
                    await self._apply(session, message)
            except InvalidArgument as exc:  # a message that does not parse
                session.failure = exc
            except StoreUnusable:
                pass  # the store has said so once, and health says NOT_SERVING
            except StoreUnavailable as exc:
                # The stream ends with the reason: the worker keeps running its
                # tasks, reconnects with backoff and sends again what was not
                # acknowledged, with the leases it holds.
                session.failure = exc
            except Exception:
                log.exception("worker stream failed")
            finally:
                session.close()

    async def _apply(self, session: WorkerSession, message: worker_pb2.WorkerMessage) -> None:
        session.last_heard = time.monotonic()
        kind = message.WhichOneof("kind")
        if kind == "credit":
            if message.credit.tasks > 0:
                session.add_credit(message.credit.tasks)
        elif kind == "heartbeat":
            refs = [convert.ref_from_proto(r) for r in message.heartbeat.held]
            held = await self._renew(session, refs)
            session.send(worker_pb2.MasterMessage(heartbeat_ack=worker_pb2.HeartbeatAck(held=held)))
        elif kind == "results":
            await self._record(session, message.results)
        elif kind == "progress":
            await self._progress(message.progress)
        elif kind == "release":
            refs = [convert.ref_from_proto(r) for r in message.release.leases]
            released = await self._rt.bridge.workers.run(self._rt.lifecycle.release, refs)
            session.running = max(0, session.running - released)
        else:
            log.warning("ignoring unexpected %s message from worker", kind)

    async def _renew(self, session: WorkerSession, held: list[LeaseRef]) -> int:
        """Extend the worker's valid leases, revoke the rest; returns how many hold."""
        stale = (
            await self._rt.bridge.workers.run(
                self._rt.lifecycle.extend, session.info.worker_id, held, self._rt.config.lease_s
            )
            if held
            else []
        )
        session.running = len(held) - len(stale)
        if stale:
            session.revoke(stale)
        return len(held) - len(stale)

    async def _progress(self, batch: worker_pb2.ProgressBatch) -> None:
        updates: list[Progress] = []
        for pb in batch.updates:
            try:
                updates.append(convert.progress_from_proto(pb))
            except InvalidArgument as exc:
                log.warning("ignoring progress of %s: %s", pb.lease.task_id, exc)
        await self._rt.bridge.workers.run(self._rt.lifecycle.set_progress, updates)

    async def _record(self, session: WorkerSession, results: worker_pb2.Results) -> None:
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
        if outcomes:
            await self._rt.bridge.workers.run(self._rt.lifecycle.record, outcomes)
        session.running = max(0, session.running - len(results.outcomes))
        session.ack_results(results.seq, max(0, results.credit))


def _results_ack(seq: int) -> worker_pb2.MasterMessage:
    return worker_pb2.MasterMessage(results_ack=worker_pb2.ResultsAck(seq=seq))


def _worker_info(hello: worker_pb2.Hello, peer: str, master_id: str) -> WorkerInfo:
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
        master_id=master_id,
    )
