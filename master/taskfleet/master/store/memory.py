"""The volatile store: everything in dicts and heaps behind one lock.

Heaps use lazy deletion: a cancelled task, a renewed lease or a lease given
back leaves its old heap entry in place, and the entry is dropped when it
reaches the top and no longer matches the task. That keeps every operation
O(log n) without searching a heap.

An unfinished task lives in a Slot in ``_slots``; a final one is frozen into
bytes the garbage collector never sees, in ``_final`` (memory_slots.py says
why and how), and thawed for every read and by RetryTask.

The slot a task lives in is in memory_slots.py, dependency bookkeeping in
memory_deps.py, schedules in memory_schedules.py, the oldest ready task of each
queue in memory_oldest.py.
"""

from __future__ import annotations

import array
import bisect
import collections
import heapq
import itertools
import threading
from collections.abc import Collection, Iterator, Sequence

from taskfleet.common.errors import FailedPrecondition, InvalidArgument
from taskfleet.common.model import (
    Lease,
    LeaseRef,
    Outcome,
    PendingName,
    Progress,
    QueueCounts,
    Schedule,
    Task,
    TaskSpec,
    TaskState,
)
from taskfleet.master.store.base import (
    DEFAULT_POLICY,
    FINAL_STATES,
    KeyLoad,
    Store,
    StorePolicy,
    TaskPage,
    TaskQuery,
    attempts_used,
    check_outcomes,
    expires_at,
    new_task_id,
    not_found,
    retry_delay_s,
    worker_lost_error,
)
from taskfleet.master.store.deps import resolve
from taskfleet.master.store.memory_deps import MemoryDeps
from taskfleet.master.store.memory_expiry import Expiring
from taskfleet.master.store.memory_oldest import OldestReady, SinceEntry
from taskfleet.master.store.memory_schedules import MemorySchedules
from taskfleet.master.store.memory_slots import (
    EXPIRES_AT,
    IDEMPOTENCY_KEY,
    NAME,
    QUEUE,
    SPEC,
    Frozen,
    ReadyEntry,
    Slot,
    fields,
    freeze,
    own_spec,
    snapshot,
    state_of,
    thaw,
    thaw_slot,
)


def _deadline_order(slot: Slot) -> tuple[float, int]:
    return slot.deadline, slot.seq


class MemoryStore(MemoryDeps, MemorySchedules, Store):
    """Fast and volatile: a restart of the master loses every task."""

    lock: threading.Lock

    def __init__(self, policy: StorePolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self.lock = threading.Lock()
        self._seq = itertools.count()
        self._slots: dict[str, Slot] = {}  # unfinished tasks
        self._final: dict[str, Frozen] = {}  # final tasks until they are deleted
        self._by_key: dict[str, str] = {}
        self._ready: dict[str, dict[str, list[ReadyEntry]]] = {}
        self._delayed: list[tuple[float, int, str]] = []
        # RUNNING tasks, which expire scans: those in flight are few beside those
        # leased per lease period, which a heap of deadlines would hold until due.
        self._running: dict[str, Slot] = {}
        self._counts: dict[str, dict[TaskState, int]] = {}
        self._keyed: dict[str, dict[str, int]] = {}  # key -> RUNNING task id -> its limit
        self._expiring = Expiring()
        self._schedules: dict[str, Schedule] = {}  # in creation order
        # Ids in submission order with their seqs, for list_tasks' keyset paging;
        # pruned ids leave holes that _compact_order closes now and then. An array
        # and a dict of ints and strs, which the garbage collector never walks, as
        # it would lists: one entry per task kept.
        self._order_seq = array.array("q")
        self._order_ids: dict[int, str] = {}
        # Waiting children of each unfinished parent, and the tasks that a call
        # readied or cancelled through them (reported with the call's own).
        self._children: dict[str, list[str]] = {}
        self._settled: list[Slot] = []
        self._oldest = OldestReady(self._ready_since)

    def submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        with self.lock:
            return self._submit(specs, now)

    def _submit(self, specs: Sequence[TaskSpec], now: float) -> list[str]:
        """``submit`` under the lock (a fired schedule tick submits through it too)."""
        ids, new = self._assign_ids(specs)
        parents_of = resolve(specs, ids)
        self._check_parents(specs, parents_of, ids, new)
        for i, spec in enumerate(specs):
            if not new[i]:
                continue
            spec = own_spec(spec, parents_of[i])
            slot = Slot(Task(ids[i], spec, created_at=now), next(self._seq))
            self._slots[slot.task.id] = slot
            self._order_seq.append(slot.seq)
            self._order_ids[slot.seq] = slot.task.id
            if spec.idempotency_key:
                self._by_key[spec.idempotency_key] = slot.task.id
            counts = self._counts.get(spec.queue)
            if counts is None:
                counts = self._counts[spec.queue] = dict.fromkeys(TaskState, 0)
            counts[TaskState.PENDING] += 1
            self._wait_or_enqueue(slot, now)
        return ids

    def _assign_ids(self, specs: Sequence[TaskSpec]) -> tuple[list[str], list[bool]]:
        """Each spec's id, and whether it is new (not a known idempotency key)."""
        ids: list[str] = []
        new: list[bool] = []
        seen: dict[str, str] = {}
        for spec in specs:
            key = spec.idempotency_key
            known = (seen.get(key) or self._by_key.get(key)) if key else None
            new.append(known is None)
            ids.append(known or new_task_id())
            if key:
                seen[key] = ids[-1]
        return ids, new

    def get(self, task_id: str) -> Task:
        with self.lock:
            return self._read(task_id)

    def get_many(self, task_ids: Sequence[str]) -> list[Task]:
        with self.lock:
            return [self._read(task_id) for task_id in task_ids]

    def get_final(self, task_ids: Sequence[str]) -> list[Task]:
        final = []
        with self.lock:
            for task_id in task_ids:
                frozen = self._final.get(task_id)
                if frozen is not None:
                    final.append(thaw(frozen))
                elif task_id not in self._slots:
                    raise not_found(task_id)
        return final

    def lease(
        self,
        worker_id: str,
        queues: Collection[str],
        names: Collection[str] | None,
        limit: int,
        lease_s: float,
        now: float,
        *,
        exclude_keys: Collection[str] = (),
    ) -> list[Lease]:
        leases: list[Lease] = []
        passed_over: list[tuple[ReadyEntry, list[ReadyEntry]]] = []
        with self.lock:
            self._promote(now)
            # One entry per non-empty heap, keyed by its top: popping the best
            # head repeatedly merges the heaps in (-priority, seq) order.
            heads = []
            for heap in self._heaps(queues, names):
                self._drop_stale(heap)
                if heap:
                    heads.append((heap[0], heap))
            heapq.heapify(heads)
            while heads and len(leases) < limit:
                heap = heads[0][1]
                entry = heapq.heappop(heap)
                slot = self._slots[entry[2]]
                if slot.task.spec.concurrency_key in exclude_keys:
                    passed_over.append((entry, heap))  # put back below, still ready
                else:
                    leases.append(self._start(slot, worker_id, lease_s, now))
                self._drop_stale(heap)
                if heap:
                    heapq.heapreplace(heads, (heap[0], heap))
                else:
                    heapq.heappop(heads)
            for entry, heap in passed_over:
                heapq.heappush(heap, entry)
        return leases

    def running_by_key(self) -> dict[str, KeyLoad]:
        with self.lock:
            return {
                key: KeyLoad(len(running), min(running.values()))
                for key, running in self._keyed.items()
            }

    def extend(
        self, worker_id: str, refs: Sequence[LeaseRef], lease_s: float, now: float
    ) -> list[LeaseRef]:
        stale = []
        with self.lock:
            for ref in refs:
                slot = self._valid(ref)
                if slot is None or slot.task.worker_id != worker_id:
                    stale.append(ref)
                    continue
                slot.deadline = now + lease_s
        return stale

    def set_progress(self, updates: Sequence[Progress]) -> list[Progress]:
        stored = []
        with self.lock:
            for update in updates:
                slot = self._valid(update.ref)
                if slot is not None:
                    slot.task.progress = update.fraction
                    slot.task.progress_message = update.message
                    stored.append(update)
        return stored

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[Task]:
        check_outcomes(outcomes)
        changed = []
        with self.lock:
            for outcome in outcomes:
                slot = self._valid(outcome.ref)
                if slot is None:
                    continue
                self._apply(slot, outcome, now)
                # A final task's slot is no longer the store's: no copy needed.
                final = slot.task.id in self._final
                changed.append(slot.task if final else snapshot(slot.task))
            changed += self._take_settled()
        return changed

    def retry(self, task_id: str, now: float) -> Task:
        with self.lock:
            state = self._state(task_id)
            if state is None:
                raise not_found(task_id)
            if state not in (TaskState.FAILED, TaskState.CANCELLED):
                raise FailedPrecondition(
                    f"task {task_id} is {state.name}: only FAILED or CANCELLED tasks can be retried"
                )
            slot = self._slots[task_id] = thaw_slot(self._final.pop(task_id))
            task = slot.task
            slot.attempt_base = task.attempts
            slot.lost_by = ()
            task.lost_leases = 0
            task.finished_at = task.expires_at = 0.0
            self._set_state(slot, TaskState.PENDING)
            self._enqueue(slot, now, now)
            return snapshot(task)

    def release(self, refs: Sequence[LeaseRef], now: float) -> int:
        released = 0
        with self.lock:
            for ref in refs:
                slot = self._valid(ref)
                if slot is None:
                    continue
                slot.task.attempts -= 1
                self._set_state(slot, TaskState.PENDING)
                self._enqueue(slot, now, now)
                released += 1
        return released

    def cancel(self, task_id: str, now: float) -> list[Task]:
        with self.lock:
            slot = self._slots.get(task_id)
            if slot is None:
                frozen = self._final.get(task_id)
                if frozen is None:
                    raise not_found(task_id)
                raise FailedPrecondition(
                    f"task {task_id} is already {state_of(fields(frozen)).name}"
                )
            self._finish(slot, TaskState.CANCELLED, now)
            return [snapshot(slot.task), *self._take_settled()]

    def expire(self, now: float) -> list[Task]:
        expired = []
        with self.lock:
            lapsed = [slot for slot in self._running.values() if slot.deadline <= now]
            lapsed.sort(key=_deadline_order)
            for slot in lapsed:
                self._lose_lease(slot, now)
                expired.append(snapshot(slot.task))
            expired += self._take_settled()
        return expired

    def prune(self, now: float, limit: int) -> int:
        with self.lock:
            pruned = self._expiring.sweep(now, limit, self._expiry, self._delete_seq)
            self._compact_order()
        return pruned

    def purge(self, query: TaskQuery, limit: int) -> int:
        states = query.states or FINAL_STATES
        if not states <= FINAL_STATES:
            raise InvalidArgument("states: only finished tasks can be purged")
        with self.lock:
            doomed = list(itertools.islice(self._matching(query, states, None), limit))
            for task_id, _ in doomed:
                self._delete(task_id)
            self._compact_order()
        return len(doomed)

    def list_tasks(self, query: TaskQuery, limit: int, cursor: int | None = None) -> TaskPage:
        with self.lock:
            found = list(itertools.islice(self._matching(query, query.states, cursor), limit + 1))
            tasks = [self._read(task_id) for task_id, _ in found[:limit]]
        more = len(found) > limit
        return TaskPage(tasks, found[limit - 1][1] if more and limit else None)

    def next_ready_at(self, now: float) -> float | None:
        with self.lock:
            self._promote(now)
            return self._delayed[0][0] if self._delayed else None

    def stats(self) -> list[QueueCounts]:
        with self.lock:
            return [QueueCounts(q, dict(self._counts[q])) for q in sorted(self._counts)]

    def oldest_pending(self, now: float) -> dict[str, float]:
        with self.lock:
            self._promote(now)
            return self._oldest.oldest()

    def pending_names(self, limit: int) -> list[PendingName]:
        with self.lock:
            counted = collections.Counter(
                (s.task.spec.queue, s.task.spec.name)
                for s in self._slots.values()
                if s.task.state is TaskState.PENDING
            )
        ranked = sorted(counted.items(), key=lambda item: (-item[1], item[0]))
        return [PendingName(queue, name, n) for (queue, name), n in ranked[:limit]]

    def _matching(
        self, query: TaskQuery, states: frozenset[TaskState], cursor: int | None
    ) -> Iterator[tuple[str, int]]:
        """Ids and seqs of the tasks ``query`` matches (in ``states`` unless empty),
        newest first, older than ``cursor``."""
        order = self._order_seq
        end = len(order) if cursor is None else bisect.bisect_left(order, cursor)
        for i in range(end - 1, -1, -1):
            task_id = self._order_ids[order[i]]
            slot = self._slots.get(task_id)
            if slot is not None:
                queue, name, state = slot.task.spec.queue, slot.task.spec.name, slot.task.state
            else:
                frozen = self._final.get(task_id)
                if frozen is None:
                    continue
                facts = fields(frozen)
                spec = facts[SPEC]
                queue, name, state = spec[QUEUE], spec[NAME], state_of(facts)
            if query.queue and queue != query.queue:
                continue
            if query.name and name != query.name:
                continue
            if states and state not in states:
                continue
            yield task_id, order[i]

    def _read(self, task_id: str) -> Task:
        """A snapshot of the task, frozen or not."""
        frozen = self._final.get(task_id)
        if frozen is not None:
            return thaw(frozen)
        slot = self._slots.get(task_id)
        if slot is None:
            raise not_found(task_id)
        return snapshot(slot.task)

    def _state(self, task_id: str) -> TaskState | None:
        """The task's state, frozen or not; None when there is no such task."""
        slot = self._slots.get(task_id)
        if slot is not None:
            return slot.task.state
        frozen = self._final.get(task_id)
        return None if frozen is None else state_of(fields(frozen))

    def _expiry(self, seq: int) -> float | None:
        """When the final task of ``seq`` expires; None if it is gone or alive."""
        task_id = self._order_ids.get(seq)
        frozen = None if task_id is None else self._final.get(task_id)
        return None if frozen is None else fields(frozen)[EXPIRES_AT]

    def _delete_seq(self, seq: int) -> None:
        self._delete(self._order_ids[seq])

    def _delete(self, task_id: str) -> None:
        """Delete a final task."""
        facts = fields(self._final.pop(task_id))
        key = facts[SPEC][IDEMPOTENCY_KEY]
        if key and self._by_key.get(key) == task_id:
            del self._by_key[key]
        queue = facts[SPEC][QUEUE]
        counts = self._counts[queue]
        counts[state_of(facts)] -= 1
        if not any(counts.values()):  # its last task: the queue leaves stats, heaps and all
            del self._counts[queue]
            self._ready.pop(queue, None)
            self._oldest.drop(queue)

    def _compact_order(self) -> None:
        """Drop deleted ids from the paging order once they are most of it."""
        if len(self._order_seq) < 2 * (len(self._slots) + len(self._final)) + 1024:
            return
        ids = self._order_ids
        kept = [
            seq for seq in self._order_seq if ids[seq] in self._slots or ids[seq] in self._final
        ]
        self._order_seq = array.array("q", kept)
        self._order_ids = {seq: ids[seq] for seq in kept}

    def _lose_lease(self, slot: Slot, now: float) -> None:
        """A lease lapsed: put the task back, or end it once it has lost too many."""
        task = slot.task
        slot.lost_by += (task.worker_id,)
        task.lost_leases += 1
        if task.lost_leases > self.policy.max_lost_leases:
            task.error = worker_lost_error(slot.lost_by)
            self._finish(slot, TaskState.FAILED, now)
            return
        self._set_state(slot, TaskState.PENDING)
        self._enqueue(slot, now, now)

    def _valid(self, ref: LeaseRef) -> Slot | None:
        """The slot ``ref`` fences, or None when the ref is stale."""
        slot = self._slots.get(ref.task_id)
        if slot is None or slot.task.state is not TaskState.RUNNING:
            return None
        return slot if slot.task.lease == ref.lease else None

    def _set_state(self, slot: Slot, state: TaskState) -> None:
        counts = self._counts[slot.task.spec.queue]
        counts[slot.task.state] -= 1
        counts[state] += 1
        key = slot.task.spec.concurrency_key
        if key and (slot.task.state is TaskState.RUNNING) != (state is TaskState.RUNNING):
            running = self._keyed.setdefault(key, {})
            if state is TaskState.RUNNING:
                running[slot.task.id] = slot.task.spec.concurrency_limit
            else:
                running.pop(slot.task.id, None)
                if not running:
                    del self._keyed[key]
        if state is TaskState.RUNNING:
            self._running[slot.task.id] = slot
        elif slot.task.state is TaskState.RUNNING:
            del self._running[slot.task.id]
        slot.task.state = state

    def _enqueue(self, slot: Slot, ready_at: float, now: float) -> None:
        """Put a PENDING task where ``lease`` finds it, or aside until ``ready_at``."""
        slot.delayed = ready_at > now
        if slot.delayed:
            heapq.heappush(self._delayed, (ready_at, slot.seq, slot.task.id))
            return
        self._make_ready(slot, now)

    def _make_ready(self, slot: Slot, since: float) -> None:
        """Put a PENDING task where ``lease`` finds it, ready since ``since``."""
        spec = slot.task.spec
        by_name = self._ready.get(spec.queue)
        if by_name is None:
            by_name = self._ready[spec.queue] = {}
        heap = by_name.get(spec.name)
        if heap is None:
            heap = by_name[spec.name] = []
        heapq.heappush(heap, (-spec.priority, slot.seq, slot.task.id))
        slot.ready_since = since
        self._oldest.add(spec.queue, (since, slot.seq, slot.task.id))

    def _ready_since(self, entry: SinceEntry) -> bool:
        """Whether the task of an ``_oldest`` entry is still ready since that time."""
        slot = self._slots.get(entry[2])
        return (
            slot is not None
            and slot.task.state is TaskState.PENDING
            and not slot.delayed
            and slot.ready_since == entry[0]
        )

    def _promote(self, now: float) -> None:
        """Move due delayed tasks to the ready heaps and drop cancelled ones from the top."""
        while self._delayed:
            ready_at, _, task_id = self._delayed[0]
            slot = self._slots.get(task_id)
            waiting = slot is not None and slot.delayed and slot.task.state is TaskState.PENDING
            if waiting and ready_at > now:
                return
            heapq.heappop(self._delayed)
            if waiting:
                assert slot is not None
                slot.delayed = False
                self._make_ready(slot, ready_at)  # waiting since it came due, not since now

    def _heaps(
        self, queues: Collection[str], names: Collection[str] | None
    ) -> Iterator[list[ReadyEntry]]:
        # dict.fromkeys drops repeated queues or names, which would visit one heap twice.
        for queue in dict.fromkeys(queues):
            by_name = self._ready.get(queue, {})
            if names is None:
                yield from by_name.values()
                continue
            for name in dict.fromkeys(names):
                if name in by_name:
                    yield by_name[name]

    def _drop_stale(self, heap: list[ReadyEntry]) -> None:
        # A ready entry outlives its task only when the task was cancelled (and maybe
        # pruned since).
        while heap:
            slot = self._slots.get(heap[0][2])
            if slot is not None and slot.task.state is TaskState.PENDING:
                return
            heapq.heappop(heap)

    def _start(self, slot: Slot, worker_id: str, lease_s: float, now: float) -> Lease:
        task = slot.task
        self._set_state(slot, TaskState.RUNNING)
        task.attempts += 1
        task.lease += 1
        task.worker_id = worker_id
        task.started_at = now
        slot.deadline = now + lease_s
        return Lease(snapshot(task), slot.deadline)

    def _apply(self, slot: Slot, outcome: Outcome, now: float) -> None:
        task = slot.task
        if outcome.state is TaskState.SUCCEEDED:
            task.result = outcome.result
            task.result_content_type = outcome.result_content_type
            task.error = None
            self._finish(slot, TaskState.SUCCEEDED, now)
        elif outcome.state is TaskState.CANCELLED:
            task.error = outcome.error or task.error
            self._finish(slot, TaskState.CANCELLED, now)
        else:
            task.error = outcome.error
            used = attempts_used(task.attempts, slot.attempt_base, task.lost_leases)
            delay_s = retry_delay_s(self.policy, outcome, used)
            if delay_s is None:
                self._finish(slot, TaskState.FAILED, now)
            else:
                self._set_state(slot, TaskState.PENDING)
                self._enqueue(slot, now + delay_s, now)

    def _finish(self, slot: Slot, state: TaskState, now: float) -> None:
        self._end(slot, state, now)
        if slot.task.id in self._children:
            self._settle(slot, now)

    def _end(self, slot: Slot, state: TaskState, now: float) -> None:
        self._set_state(slot, state)
        task = slot.task
        task.finished_at = now
        task.expires_at = expires_at(task.spec, now, self.policy)
        if task.expires_at:
            self._expiring.add(task.expires_at, slot.seq)
        # Frozen from now on: the slot, which the caller may still read for its
        # answer, is no longer the store's.
        self._final[task.id] = freeze(slot)
        del self._slots[task.id]
