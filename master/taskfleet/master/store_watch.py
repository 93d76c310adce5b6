"""Health that follows the store: a master whose database cannot be reached says
NOT_SERVING, and SERVING again once the database answers, without a restart.

One task on the loop pings the store every second, and twice a second while it
is away; a store call that finds the server gone wakes it at once (through
``Store.on_unavailable``), so an outage is noticed by the first call that meets
it. Pings run on a thread, so a database that hangs instead of refusing holds
no store thread of the master's; a ping unanswered after ``PING_TIMEOUT_S``
counts as a failure.

While the database was away no worker could renew a lease, so every lease may
have run out: leases lapse again only ``settle_s`` after it answers, time for
the workers, which reconnect with backoff, to come back and renew what they hold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

from taskfleet.master.loop import LoopBridge
from taskfleet.master.store.base import Store

log = logging.getLogger("taskfleet.master.store")

PROBE_INTERVAL_S = 1.0
RETRY_INTERVAL_S = 0.5
PING_TIMEOUT_S = 5.0


class HealthStatus(Protocol):
    async def serving(self) -> None: ...

    async def not_serving(self) -> None: ...


class StoreWatch:
    """Whether the store answers, as the health service and the reaper see it."""

    def __init__(self, store: Store, bridge: LoopBridge, settle_s: float) -> None:
        self._store = store
        self._bridge = bridge
        self._settle_s = settle_s
        self.problem = ""  # why the store cannot be used, while it cannot
        # Monotonic time from which lapsed leases are returned; infinite from a
        # failure until the store answers again.
        self._lapses_from = 0.0
        self._wake = asyncio.Event()
        self._probe: asyncio.Future[None] | None = None

    @property
    def available(self) -> bool:
        return not self.problem

    def trouble(self) -> None:
        """A store call found the server gone: look now. Safe from any thread."""
        self._lapses_from = math.inf
        self._bridge.call(self._wake.set)

    def leases_may_lapse(self) -> bool:
        """False while the store is in trouble and for ``settle_s`` after. Safe from
        any thread."""
        return time.monotonic() >= self._lapses_from

    async def run(self, health: HealthStatus, where: str) -> None:
        """Until cancelled; ``where`` names the store in the log (no password)."""
        lost_at = 0.0
        while True:
            self._wake.clear()  # before pinging: trouble from now on is seen
            problem = await self._ping()
            if problem:
                self._lapses_from = math.inf
                if not self.problem:
                    lost_at = time.monotonic()
                    log.warning("store %s: %s; NOT_SERVING until it answers", where, problem)
                    await health.not_serving()
                self.problem = problem
            elif self._lapses_from == math.inf:  # trouble before or during the ping
                self._lapses_from = time.monotonic() + self._settle_s
                if self.problem:
                    self.problem = ""
                    log.info(
                        "store %s answers again after %.1f s; SERVING (leases lapse again "
                        "in %.0f s, once workers renewed them)",
                        where,
                        time.monotonic() - lost_at,
                        self._settle_s,
                    )
                    await health.serving()
                else:
                    log.info("store %s lost its connections and reconnected", where)
            try:
                async with asyncio.timeout(RETRY_INTERVAL_S if self.problem else PROBE_INTERVAL_S):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _ping(self) -> str:
        """ "" when the store answers, else why it does not. A ping that outlives
        its timeout is awaited again next time rather than started twice."""
        if self._probe is None:
            self._probe = asyncio.ensure_future(asyncio.to_thread(self._store.ping))
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), PING_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {PING_TIMEOUT_S:.0f} s"
        except Exception as exc:
            self._probe = None
            return str(exc) or type(exc).__name__
        self._probe = None
        return ""
