"""The store watch on its own, without a network: health follows the store's
pings, and leases do not lapse from the first failure until a while after the
store answers again. test_pg_faults.py proves the same with a real server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from taskfleet.common.errors import StoreUnavailable
from taskfleet.master.loop import LoopBridge
from taskfleet.master.store import MemoryStore
from taskfleet.master.store_watch import StoreWatch

SETTLE_S = 3.0
WAIT_S = 30.0


class OutageStore(MemoryStore):
    """A memory store whose ping fails while ``down`` is set, as a lost database's would."""

    down = False

    def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("database unreachable: switched off by the test")


class Health:
    def __init__(self) -> None:
        self.said: list[str] = []

    async def serving(self) -> None:
        self.said.append("SERVING")

    async def not_serving(self) -> None:
        self.said.append("NOT_SERVING")


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching() -> AsyncIterator[tuple[OutageStore, StoreWatch, Health]]:
    """A watch running on a store that answers, with the health it sets."""
    store = OutageStore()
    watch = StoreWatch(store, LoopBridge(store.lock), settle_s=SETTLE_S)
    health = Health()
    running = asyncio.create_task(watch.run(health, "memory"))
    try:
        yield store, watch, health
    finally:
        running.cancel()


def test_health_and_lapses_follow_the_store_through_an_outage() -> None:
    async def story() -> None:
        # Given a watch on a store that answers
        async with watching() as (store, watch, health):
            assert watch.available
            assert watch.leases_may_lapse()

            # When a store call finds the server gone
            store.down = True
            watch.trouble()

            # Then leases stop lapsing at once, and health turns NOT_SERVING once
            assert not watch.leases_may_lapse()
            await until(lambda: health.said == ["NOT_SERVING"], "NOT_SERVING")
            assert not watch.available
            assert watch.problem == "database unreachable: switched off by the test"

            # When the store answers again
            store.down = False
            await until(lambda: watch.available, "the store to be available")
            back_at = time.monotonic()

            # Then health is SERVING again, while leases still wait for the workers
            assert health.said == ["NOT_SERVING", "SERVING"]
            if time.monotonic() - back_at < SETTLE_S / 2:  # not held up by a loaded machine
                assert not watch.leases_may_lapse()
            await until(watch.leases_may_lapse, "leases to lapse again")
            assert time.monotonic() - back_at > SETTLE_S / 2
            assert health.said == ["NOT_SERVING", "SERVING"]

    asyncio.run(story())


def test_a_failure_the_next_ping_does_not_confirm_still_holds_lapses_a_while() -> None:
    async def story() -> None:
        # Given a watch on a store that answers
        async with watching() as (_, watch, health):
            await until(lambda: watch.leases_may_lapse(), "the first ping")

            # When a call fails but the store answers the ping that follows (a
            # restart between two calls, say)
            watch.trouble()
            failed_at = time.monotonic()

            # Then health never leaves SERVING, and leases wait as after an outage
            await until(watch.leases_may_lapse, "leases to lapse again")
            assert time.monotonic() - failed_at > SETTLE_S / 2
            assert health.said == []

    asyncio.run(story())
