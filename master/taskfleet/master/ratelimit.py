"""Rate limits across the fleet: ``--rate-limit NAME=N/s`` on the master.

Tasks of a limited name are leased at most at that rate, by all workers of all
masters together. Each limited name has a token bucket holding at most one
second's worth of tokens (at least one), refilled continuously; leasing a task
of that name takes a token. Tasks held back stay PENDING in the store.

``Lifecycle.lease`` is the one place tasks are handed out, so the limit is kept
there, in two steps:

- before leasing, names whose bucket was found empty are left out of the names
  the store is asked for (until the next token is due), so idle workers get
  other work instead of being handed tasks they cannot run yet;
- after leasing, one atomic take per limited name asks for as many tokens as
  tasks of that name were leased; those beyond the tokens granted are released
  at once (the store's ``release``, which does not count the attempt).

The first step is only a hint kept by this master; the second is what holds the
limit. The bucket lives in the master process (``LocalBuckets``) for the stores
one master uses, and in a PostgreSQL row per name (``PostgresBus.take_tokens``,
refilled by the database's clock) when masters share a database. Held-back work
is looked at again when idle workers recheck the store (at least every second).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from taskfleet.common.model import Lease, LeaseRef

# Names asked of the store's pending counts when a lease names no task names
# but some limited name is held back (a rare path: workers send their names).
MAX_PENDING_NAMES = 1000


class Buckets(Protocol):
    """Token buckets keyed by task name; safe from any thread."""

    def take_tokens(self, key: str, want: int, rate_per_s: float, burst: float) -> int:
        """Refill ``key``'s bucket for the time since its last take (at ``rate_per_s``,
        holding at most ``burst``), take up to ``want`` whole tokens in one atomic
        step and return how many were taken. A new bucket starts full."""
        ...


class LocalBuckets:
    """Buckets in this process: right when one master serves the store."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take_tokens(self, key: str, want: int, rate_per_s: float, burst: float) -> int:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + rate_per_s * max(0.0, now - at))
            taken = max(0, min(want, int(tokens)))
            self._buckets[key] = (tokens - taken, max(at, now))
            return taken


def burst_of(rate_per_s: float) -> float:
    """The tokens a bucket holds at most: one second's worth, at least one, so
    that workers rechecking every second keep the rate."""
    return max(1.0, rate_per_s)


class RateLimiter:
    """Keeps ``limits`` (task name -> tasks per second) over leases."""

    def __init__(
        self,
        limits: Mapping[str, float],
        buckets: Buckets,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = dict(limits)
        self._buckets = buckets
        self._clock = clock
        self._lock = threading.Lock()
        self._held_until: dict[str, float] = {}  # name -> monotonic time its next token is due

    def held_back(self) -> set[str]:
        """Limited names whose bucket was found empty and has not refilled yet."""
        now = self._clock()
        with self._lock:
            return {name for name, until in self._held_until.items() if until > now}

    def open_names(
        self, names: Collection[str] | None, pending: Callable[[], Collection[str]]
    ) -> Collection[str] | None:
        """The names to lease: ``names`` without those held back. For None (any
        name) while some name is held back, the names ``pending`` lists instead,
        so that tasks behind held-back ones are not starved."""
        held = self.held_back()
        if not held:
            return names
        return [n for n in (pending() if names is None else names) if n not in held]

    def admit(self, leases: Sequence[Lease]) -> tuple[list[Lease], list[LeaseRef]]:
        """Split ``leases`` into those within the limits and those to release."""
        by_name: dict[str, list[Lease]] = defaultdict(list)
        for lease in leases:
            if lease.task.spec.name in self.limits:
                by_name[lease.task.spec.name].append(lease)
        if not by_name:
            return list(leases), []
        excess: set[str] = set()
        for name, group in by_name.items():
            rate_per_s = self.limits[name]
            taken = self._buckets.take_tokens(name, len(group), rate_per_s, burst_of(rate_per_s))
            if taken < len(group):
                excess.update(lease.ref.task_id for lease in group[taken:])
                with self._lock:
                    self._held_until[name] = self._clock() + 1.0 / rate_per_s
        kept = [lease for lease in leases if lease.ref.task_id not in excess]
        return kept, [lease.ref for lease in leases if lease.ref.task_id in excess]
