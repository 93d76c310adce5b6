"""When the worker sends outcomes and asks for credit, in-process: the batches
and credit rules with the clock passed in. No master, no pool, no threads."""

from __future__ import annotations

import pytest

from taskfleet.common.batching import BATCH_BYTES
from taskfleet.common.model import JSON, LeaseRef, Outcome, TaskState
from taskfleet.worker.batches import GATHER_MAX, GATHER_S, Batches
from taskfleet.worker.credit import PREFETCH_BYTES, Credit
from taskfleet.worker.execute import Job
from taskfleet.worker.lease_book import LeaseBook

SLOTS = 2
PREFETCH = 10
NOW = 1000.0


def job(task_id: str) -> Job:
    return Job(LeaseRef(task_id, 1), "square", "default", 1, b"{}", JSON, 0.0, None, {})


def outcome(task_id: str, result: bytes = b"4") -> Outcome:
    return Outcome(LeaseRef(task_id, 1), TaskState.SUCCEEDED, result=result)


def setup(running: int = 0) -> Batches:
    """The batches of a book with ``running`` jobs in the pool, and their credit."""
    book = LeaseBook()
    book.accept([job(f"run-{i}") for i in range(running)])
    book.start(running)
    credit = Credit(SLOTS, PREFETCH, gather_s=GATHER_S)
    return Batches(book, credit)


# -- credit ------------------------------------------------------------------


def test_credit_is_one_task_a_slot_plus_one_until_times_are_known() -> None:
    credit = Credit(SLOTS, PREFETCH, gather_s=GATHER_S)
    assert credit.capacity() == SLOTS + 1
    assert credit.wanted(holding=0, draining=False) == SLOTS + 1
    assert credit.wanted(holding=0, draining=True) == 0


def test_prefetch_covers_four_round_trips_of_short_jobs_up_to_the_limit() -> None:
    credit = Credit(SLOTS, PREFETCH, gather_s=0.005)
    # Jobs of 20 ms, acks after 15 ms (+5 ms gathering): 2 slots get through 2 jobs
    # a round trip, 8 in the four the prefetch covers.
    credit.job_took(0.020)
    credit.round_trip_took(0.015)
    assert credit.capacity() == SLOTS + 8
    # Much shorter jobs would want more than --prefetch: the limit holds.
    credit.job_s = 0.0001
    assert credit.capacity() == SLOTS + PREFETCH
    # Long jobs get a prefetch of one.
    credit.job_s = 60.0
    assert credit.capacity() == SLOTS + 1


def test_prefetch_holds_about_prefetch_bytes_of_payloads() -> None:
    credit = Credit(SLOTS, 100_000, gather_s=GATHER_S)
    credit.job_took(0.0001)
    credit.round_trip_took(0.010)
    unbounded = credit.capacity() - SLOTS
    assert unbounded > 1_000  # short jobs: many round trips' worth
    # Small payloads leave it as it is; 1 MiB ones bound it by bytes.
    credit.arrived(10, 10 * 100)
    assert credit.capacity() - SLOTS == unbounded
    credit.payload_bytes = None
    credit.arrived(10, 10 * 1024 * 1024)
    assert credit.capacity() - SLOTS == PREFETCH_BYTES // (1024 * 1024)
    # However large, one task is still prefetched.
    credit.payload_bytes = 2 * PREFETCH_BYTES
    assert credit.capacity() == SLOTS + 1


def test_the_moving_average_leans_to_the_past() -> None:
    credit = Credit(SLOTS, PREFETCH, gather_s=GATHER_S)
    credit.job_took(1.0)
    credit.job_took(2.0)
    assert credit.job_s == pytest.approx(1.1)


def test_credit_asked_for_counts_until_it_arrives_or_the_stream_ends() -> None:
    credit = Credit(SLOTS, PREFETCH, gather_s=GATHER_S)
    credit.asked(3)
    assert credit.wanted(holding=0, draining=False) == 0
    credit.arrived(2, 0)
    assert credit.requested == 1
    assert credit.wanted(holding=3, draining=False) == -1  # 0 or less: none
    credit.arrived(5, 0)  # more than asked for (a resent Hello's leases): never below 0
    assert credit.requested == 0
    credit.asked(3)
    credit.new_stream()
    assert credit.wanted(holding=0, draining=False) == SLOTS + 1


# -- batches -----------------------------------------------------------------


def test_an_idle_pool_sends_its_outcome_at_once_with_credit() -> None:
    batches = setup(running=0)
    credit = batches.credit
    batches.add([outcome("a")], NOW)

    assert batches.ready(NOW)
    batch = batches.take(NOW)

    assert batch is not None
    assert batch.seq == 1 and batch.outcomes == [outcome("a")]
    assert batch.credit == SLOTS + 1 and credit.requested == SLOTS + 1
    assert batches.held() == [LeaseRef("a", 1)]


def test_a_busy_pool_gathers_outcomes_for_a_moment() -> None:
    # Given a job still running when another's outcome is added
    batches = setup(running=1)
    batches.add([outcome("a")], NOW)
    batches.add([outcome("b")], NOW + GATHER_S / 2)
    # Then nothing goes out before GATHER_S after the first
    assert batches.wait_s(NOW) == pytest.approx(GATHER_S)
    assert not batches.ready(NOW + GATHER_S / 2)
    assert batches.take(NOW + GATHER_S / 2) is None
    # ... and both go out together then
    batch = batches.take(NOW + GATHER_S)
    assert batch is not None and [o.ref.task_id for o in batch.outcomes] == ["a", "b"]


def test_the_sender_hears_of_outcomes_that_start_or_fill_a_batch_however_many_come() -> None:
    # Given a busy pool whose outcomes are reported several at a time
    batches = setup(running=1)
    half = GATHER_MAX // 2
    # Then the sender hears of the first ones (they start the gathering) ...
    assert batches.add([outcome(f"a{i}") for i in range(3)], NOW)
    # ... not of more while the batch gathers, nor of none
    assert not batches.add([outcome(f"b{i}") for i in range(half)], NOW)
    assert not batches.add([], NOW)
    # ... and of those that take the batch past full, though it never held exactly GATHER_MAX
    assert batches.add([outcome(f"c{i}") for i in range(half)], NOW)
    assert len(batches.outcomes) > GATHER_MAX
    # But not while a batch awaits its ack: the ack wakes it
    first = batches.take(NOW)
    assert first is not None and len(first.outcomes) == GATHER_MAX
    assert not batches.add([outcome(f"d{i}") for i in range(GATHER_MAX)], NOW)


def test_a_full_batch_goes_at_once_and_the_rest_waits_for_its_ack() -> None:
    batches = setup(running=1)
    for i in range(GATHER_MAX + 3):
        batches.add([outcome(f"t{i}")], NOW)

    first = batches.take(NOW)
    assert first is not None and len(first.outcomes) == GATHER_MAX
    # One batch unacknowledged at a time: the other three wait, however late it is.
    assert not batches.ready(NOW + 60.0)
    assert batches.take(NOW + 60.0) is None
    assert batches.wait_s(NOW) is None

    assert batches.ack(first.seq, NOW + 0.002)  # the sender waits for this ack
    second = batches.take(NOW + 60.0)
    assert second is not None and second.seq == first.seq + 1 and len(second.outcomes) == 3


def test_large_outcomes_are_cut_by_bytes() -> None:
    batches = setup(running=0)
    big = b"x" * (BATCH_BYTES // 2)
    for i in range(3):
        batches.add([outcome(f"big{i}", result=big)], NOW)

    batch = batches.take(NOW)

    assert batch is not None and len(batch.outcomes) == 1
    assert len(batches.outcomes) == 2


def test_an_ack_measures_the_round_trip_and_frees_the_leases() -> None:
    batches = setup(running=1)
    credit = batches.credit
    batches.add([outcome("a")], NOW)
    batch = batches.take(NOW + GATHER_S)  # gathered while the pool is busy
    assert batch is not None

    assert not batches.ack(batch.seq, NOW + GATHER_S + 0.020)  # nothing more to send

    assert credit.round_trip_s == pytest.approx(0.020)
    assert batches.held() == []


def test_the_ack_of_a_batch_sent_holding_no_task_is_no_round_trip_but_the_first() -> None:
    # The master may hold that ack back until it has work to send with it; but
    # without any round trip known, the prefetch would stay at one.
    batches = setup(running=0)
    for i, expected in enumerate((0.020, 0.020)):
        batches.add([outcome(f"t{i}")], NOW)
        batch = batches.take(NOW)
        assert batch is not None
        batches.ack(batch.seq, NOW + 0.020 * (i + 1))
        assert batches.credit.round_trip_s == pytest.approx(expected)
    assert batches.settled() and batches.held() == []


def test_credit_alone_when_no_outcome_is_due_and_none_awaits_an_ack() -> None:
    batches = setup(running=0)
    credit = batches.credit
    assert batches.ready(NOW)
    assert batches.take(NOW) is None  # no outcomes: no batch
    assert batches.take_credit() == SLOTS + 1
    assert batches.take_credit() == 0  # already asked for
    assert not batches.ready(NOW)

    # An unacknowledged batch carries the next request for credit instead.
    credit.new_stream()
    batches.add([outcome("a")], NOW)
    sent = batches.take(NOW)
    assert sent is not None
    credit.new_stream()
    assert batches.take_credit() == 0


def test_unacknowledged_batches_are_resent_in_order_without_timing() -> None:
    # Given two batches sent, the first one acknowledged too late to matter
    batches = setup(running=1)
    credit = batches.credit
    batches.add([outcome("a")], NOW)
    first = batches.take(NOW + GATHER_S)
    assert first is not None
    batches.ack(first.seq, NOW + 0.010)
    batches.add([outcome("b")], NOW)
    batches.add([outcome("c")], NOW)
    second = batches.take(NOW + GATHER_S)
    assert second is not None
    # When the stream is lost and a new one opens
    resend = batches.to_resend()
    # Then the batch goes again as it was, asking for no credit
    assert [(b.seq, b.outcomes, b.credit) for b in resend] == [(second.seq, second.outcomes, 0)]
    # ... and its ack on the new stream does not count the outage as a round trip
    batches.ack(second.seq, NOW + 30.0)
    assert credit.round_trip_s == pytest.approx(0.010 - GATHER_S)


def test_revoked_outcomes_are_not_sent() -> None:
    batches = setup(running=1)
    batches.add([outcome("a")], NOW)
    batches.add([outcome("b")], NOW)

    batches.drop({LeaseRef("a", 1)})

    batch = batches.take(NOW + GATHER_S)
    assert batch is not None and batch.outcomes == [outcome("b")]


def test_a_draining_worker_sends_at_once_asks_for_nothing_and_awaits_its_last_ack() -> None:
    batches = setup(running=1)
    book = batches.book
    book.drain()
    # The first outcome: the sender must hear of it
    assert batches.add([outcome("a")], NOW)

    batch = batches.take(NOW)  # no gathering while draining

    assert batch is not None and batch.credit == 0
    assert batches.take_credit() == 0
    assert batches.ack(batch.seq, NOW + 0.001)  # the drain waits for this ack
