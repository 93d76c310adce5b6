"""Concurrency keys: at most ``TaskSpec.concurrency_limit`` RUNNING tasks share a
``TaskSpec.concurrency_key`` (one import per customer at a time).

``Lifecycle.lease`` is the one place tasks are handed out, so the limit is kept
there, around the store's claim:

- before the claim, the keys already at their limit (``Store.running_by_key``,
  an indexed count of RUNNING keyed tasks) are passed to ``Store.lease`` as
  ``exclude_keys``: their tasks stay ready but are passed over, so a key with a
  thousand queued tasks cannot fill every claim and its neighbours' tasks run
  in the free slots (fairness across keys: a blocked key costs nothing, and a
  key is never blocked by another one's backlog);
- after the claim has committed, the RUNNING tasks of each leased key are
  counted again, and the leases beyond the limit are released at once
  (``Store.release``: back to PENDING and ready, the attempt not counted).

The first step is only a hint; the second is what holds the limit, also with
several masters on one PostgreSQL database, without a lock. Each master counts
in a statement of its own that starts after its claim committed (READ
COMMITTED: the count sees every claim committed before it). Of any set of
tasks of one key kept running at one moment, take the one counted last: every
other one was claimed (committed) before its own count, so before this last
count, and was still RUNNING then, so the last count saw them all and kept its
own lease only if the total was within the limit. Racing claims can therefore
both release (a task waits for the next lease), never both keep. The same
holds for SQLite and the memory store, whose claims are serialised anyway.

Tasks sharing a key should give the same limit; a task is kept only while the
RUNNING tasks of its key are fewer than the smallest limit among them and it.
As everywhere in taskfleet, a worker presumed dead whose lease lapsed may still
be running its task when the task is leased again (at-least-once delivery).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from taskfleet.common.model import Lease, LeaseRef
from taskfleet.master.store.base import Store


def full_keys(store: Store) -> set[str]:
    """The keys whose RUNNING tasks reached their limit: left out of the next claim."""
    return {key for key, load in store.running_by_key().items() if load.running >= load.limit}


def admit(store: Store, leases: Sequence[Lease]) -> tuple[list[Lease], list[LeaseRef]]:
    """Split ``leases`` (claimed and committed) into those within their keys' limits
    and those to release; the earlier leases of a key are kept first."""
    by_key: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        if lease.task.spec.concurrency_key:
            by_key[lease.task.spec.concurrency_key].append(lease)
    if not by_key:
        return list(leases), []
    loads = store.running_by_key()
    excess: set[str] = set()
    for key, group in by_key.items():
        limit = min(lease.task.spec.concurrency_limit for lease in group)
        load = loads.get(key)
        if load is not None:
            limit = min(limit, load.limit)
        # Ours are RUNNING and counted in the load, unless ended since (then fewer).
        others = max(0, (load.running if load is not None else 0) - len(group))
        keep = max(0, limit - others)
        excess.update(lease.ref.task_id for lease in group[keep:])
    kept = [lease for lease in leases if lease.ref.task_id not in excess]
    return kept, [lease.ref for lease in leases if lease.ref.task_id in excess]


class KeyLimits:
    """The two steps above, for one master's leases.

    The first step costs a query per lease (a round trip on PostgreSQL) that
    only matters once keyed tasks are about: until this master has leased one,
    it is skipped, and the second step (which counts only leased keys) still
    holds every limit. So a master whose tasks never name a key pays nothing."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._keys_seen = False

    def full(self) -> set[str]:
        return full_keys(self._store) if self._keys_seen else set()

    def admit(self, leases: Sequence[Lease]) -> tuple[list[Lease], list[LeaseRef]]:
        if not self._keys_seen:
            self._keys_seen = any(lease.task.spec.concurrency_key for lease in leases)
        return admit(self._store, leases)
