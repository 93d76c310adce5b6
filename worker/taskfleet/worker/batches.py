"""When the worker sends its outcomes and its credit: Results batches.

Outcomes and credit travel together in one Results batch, and only one batch
is unacknowledged at a time: the next waits for the ack. While the pool is
still busy, outcomes also gather for up to ``GATHER_S`` (more are about to
come); an idle pool sends at once. So a busy worker sends one large batch per
round trip, and a lone task is not held back. Batches are cut by count and by
bytes; what is left waits for the ack.

No gRPC and no threads here: the caller holds the worker's lock, passes the
time in, and turns a ``Batch`` into a message after letting go of the lock.
"""

from __future__ import annotations

from typing import NamedTuple

from taskfleet.common.batching import cut, outcome_bytes
from taskfleet.common.model import LeaseRef, Outcome
from taskfleet.worker.credit import Credit
from taskfleet.worker.lease_book import LeaseBook

# How long outcomes may gather into one batch while the pool is busy. 10 ms rather
# than 5 gave W1 6% more (medians of 9 runs each, alternating: 13.1k -> 13.9k/s)
# for about 8 us less CPU a task; a lone task is sent at once either way.
GATHER_S = 0.010
GATHER_MAX = 500  # ... and how many at most (and batching.BATCH_BYTES at most)


class Batch(NamedTuple):
    """One Results batch: its sequence number, outcomes and the credit it asks for."""

    seq: int
    outcomes: list[Outcome]
    credit: int


class Batches:
    """Outcomes not yet sent, and batches sent but not yet acknowledged."""

    def __init__(self, book: LeaseBook, credit: Credit) -> None:
        self.book = book
        self.credit = credit
        self.outcomes: list[Outcome] = []  # finished, not yet sent
        self.unacked: dict[int, list[Outcome]] = {}  # sent, not yet acknowledged
        self._gather_until = 0.0  # when the oldest of outcomes must be sent
        self._seq = 0
        self._sent_at: dict[int, float] = {}

    def add(self, outcomes: list[Outcome], now: float) -> bool:
        """Queue ``outcomes`` to send; the first of a batch starts the gathering.
        True when they started a batch or filled one while no ack is awaited:
        the sender, waiting, must hear of it."""
        before = len(self.outcomes)
        if not outcomes:
            return False
        self.outcomes += outcomes
        if not before:
            self._gather_until = now + GATHER_S
        return not self.unacked and (not before or before < GATHER_MAX <= len(self.outcomes))

    def drop(self, refs: set[LeaseRef]) -> None:
        """Forget unsent outcomes of revoked leases."""
        self.outcomes = [o for o in self.outcomes if o.ref not in refs]

    def held(self) -> list[LeaseRef]:
        """The leases whose outcome is unsent or unacknowledged."""
        refs = [o.ref for o in self.outcomes]
        refs += (o.ref for batch in self.unacked.values() for o in batch)
        return refs

    def settled(self) -> bool:
        """Whether every outcome has been sent and acknowledged."""
        return not (self.outcomes or self.unacked)

    def ready(self, now: float) -> bool:
        """Whether there is something to send now: a batch or credit alone."""
        if self.unacked:
            return False
        if self.outcomes:
            return (
                now >= self._gather_until
                or len(self.outcomes) >= GATHER_MAX
                or not self.book.running
                or self.book.draining
            )
        return self._credit_wanted() > 0

    def wait_s(self, now: float) -> float | None:
        """How long until gathered outcomes are due; None if none gather."""
        if self.outcomes and not self.unacked:
            return self._gather_until - now
        return None

    def take(self, now: float) -> Batch | None:
        """The next batch, if one is due; it counts as sent from here. Its list of
        outcomes is never changed in place, so it may be converted to protobuf
        after the lock is let go of."""
        if not (self.outcomes and self.ready(now)):
            return None
        credit = max(0, self._credit_wanted())
        self.credit.asked(credit)
        self._seq += 1
        outcomes = next(cut(self.outcomes, outcome_bytes, max_count=GATHER_MAX))
        self.outcomes = self.outcomes[len(outcomes) :]
        self.unacked[self._seq] = outcomes
        if self.book.holding() or self.credit.round_trip_s is None:
            # Acked at once. A worker holding no task may get its ack only with its
            # next assignments (the master's _dispatch): that wait is no round trip,
            # though the first one counts (without any, the prefetch stays at one).
            self._sent_at[self._seq] = now
        return Batch(self._seq, outcomes, credit)

    def take_credit(self) -> int:
        """Credit to ask for on its own, when no batch goes out (0: none); it
        counts as asked for from here."""
        want = self._credit_wanted()
        if want <= 0 or self.unacked:
            return 0
        self.credit.asked(want)
        return want

    def ack(self, seq: int, now: float) -> bool:
        """Forget the batches up to ``seq``: the master has recorded them. True when
        the sender waits for this ack (to send more, or, draining, to finish)."""
        sent_at = self._sent_at.pop(seq, None)
        if sent_at is not None:
            self.credit.round_trip_took(now - sent_at)
        while self.unacked and next(iter(self.unacked)) <= seq:
            acked = next(iter(self.unacked))
            del self.unacked[acked]
            self._sent_at.pop(acked, None)
        return not self.unacked and (
            bool(self.outcomes) or self._credit_wanted() > 0 or self.book.draining
        )

    def to_resend(self) -> list[Batch]:
        """The unacknowledged batches, in order, to send again on a new stream.
        Their round trips go unmeasured: they would count the outage."""
        self._sent_at.clear()
        return [Batch(seq, outcomes, 0) for seq, outcomes in sorted(self.unacked.items())]

    def _credit_wanted(self) -> int:
        return self.credit.wanted(self.book.holding(), self.book.draining)
