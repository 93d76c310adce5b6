"""Where the master makes a store call: on its loop while the store's lock is
free, on a lane thread while another thread holds it, and always on a thread
for a store without one lock (postgres)."""

from __future__ import annotations

import asyncio
import threading

from taskfleet.master.loop import LoopBridge

WAIT_S = 30.0


def test_a_call_runs_on_the_loop_while_the_lock_is_free_and_takes_it_itself() -> None:
    async def story() -> None:
        # Given a bridge for a store with one lock, free
        lock = threading.Lock()
        bridge = LoopBridge(lock)
        loop_thread = threading.get_ident()
        try:

            def call() -> int:
                with lock:  # as every store call does: the lane does not hold it
                    return threading.get_ident()

            # When a producer and a worker make a call
            for lane in (bridge.producers, bridge.workers):
                # Then it ran on the loop's thread
                assert await asyncio.wait_for(lane.run(call), WAIT_S) == loop_thread
            # And the lock is free again afterwards
            assert not lock.locked()
        finally:
            bridge.close()

    asyncio.run(story())


def test_a_call_goes_to_a_thread_while_another_holds_the_lock_and_later_ones_wait() -> None:
    async def story() -> None:
        # Given a bridge whose store lock another thread holds (as the reaper does)
        lock = threading.Lock()
        bridge = LoopBridge(lock)
        taken, release = threading.Event(), threading.Event()

        def reaper() -> None:
            with lock:
                taken.set()
                release.wait(WAIT_S)

        holder = threading.Thread(target=reaper)
        holder.start()
        assert taken.wait(WAIT_S)
        try:

            def call() -> int:
                with lock:  # as every store call does
                    return threading.get_ident()

            # When the loop makes a call, and then another on the other lane
            first = asyncio.ensure_future(bridge.workers.run(call))
            for _ in range(3):
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(bridge.producers.run(call))

            # Then the loop goes on serving while the calls wait for the lock
            for _ in range(3):
                await asyncio.sleep(0.01)
            assert not first.done() and not second.done()

            # And once the lock is let go, the first call ends on a lane thread
            release.set()
            loop_thread = threading.get_ident()
            assert await asyncio.wait_for(first, WAIT_S) not in (loop_thread, holder.ident)
            # And the second, which waited for the first rather than join it on
            # the lane threads, on the loop
            assert await asyncio.wait_for(second, WAIT_S) == loop_thread
        finally:
            release.set()
            holder.join(WAIT_S)
            bridge.close()

    asyncio.run(story())


def test_a_store_without_one_lock_is_always_called_on_a_thread() -> None:
    async def story() -> None:
        # Given a bridge for a store that waits on a network (no lock)
        bridge = LoopBridge(None)
        try:
            # When a call is made
            thread = await bridge.producers.run(threading.get_ident)

            # Then it ran on a lane thread, not the loop's
            assert thread != threading.get_ident()
        finally:
            bridge.close()

    asyncio.run(story())
