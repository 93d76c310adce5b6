"""The master's event loop as the rest of the master sees it.

The gRPC server runs on one asyncio loop, so an open stream costs a few
objects, not a thread. Two things cross that boundary, both through
``LoopBridge``:

- store calls. A store whose calls all take one lock (memory, sqlite) is called
  on the loop while that lock is free, and on a thread of a small pool ("lane")
  while another thread (the lease reaper, the manager endpoint) holds it, so the
  loop does not wait on the lock (but for a call that takes it in between). A
  store that waits on a network (postgres) is always called on a lane. On the
  loop, a sqlite call keeps the loop through its fsync; handing it to a thread
  cost more: two thread hand-offs a call and the GIL passed to and fro at each
  SQLite step made W1 on sqlite about a third slower (docs/benchmarks.md,
  twelfth run);
- wake-ups from other threads (the manager endpoint and the lease reaper run
  in threads) are handed to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Threads a lane has. Calls to a store with one lock go to them only while
# another thread holds it; for postgres, a few let a slow call (a large lease, a
# stats scan, a lost network round trip) overlap the quick ones.
PRODUCER_THREADS = 2
WORKER_THREADS = 4


class StoreLock:
    """A store's one lock as the loop sees it, shared by both lanes.

    ``away`` is the latest call handed to a lane thread because the lock was
    busy. Later calls wait for it before trying the lock again: the calls on
    lane threads would otherwise keep the lock busy for each other, and under
    load the master would stay on threads long after the reaper let go."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.away: asyncio.Future[Any] | None = None


class StoreLane:
    """A thread pool for store calls: for a store without one lock (postgres),
    calls on one lane never wait in line behind another lane's. For a store with
    one, a call runs at once on the loop while the lock is free. The lane does
    not hold the lock around the call (the store takes it inside), so no lock the
    call takes after the store's is ever nested in it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        threads: int,
        store_lock: StoreLock | None,
    ) -> None:
        self._loop = loop
        self._store_lock = store_lock
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on this lane, with the calling task's log context."""
        store_lock = self._store_lock
        while store_lock is not None:
            if not store_lock.lock.locked():
                return fn(*args, **kwargs)
            away = store_lock.away
            if away is None or away.done():
                break  # another thread holds the lock
            await asyncio.wait((away,))
        context = contextvars.copy_context()
        call = self._loop.run_in_executor(
            self._pool, functools.partial(context.run, fn, *args, **kwargs)
        )
        if store_lock is not None:
            store_lock.away = call
        return await call

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class LoopBridge:
    """The loop the master's RPCs run on and the lanes its store calls run on.

    Built inside the running loop, so it knows the loop's thread. Producers'
    calls and worker streams' calls take separate lanes: hundreds of workers
    woken by one Submit each ask the store for work, and a GetStats must not
    queue behind all of them. ``store_lock`` is ``Store.lock``."""

    def __init__(self, store_lock: threading.Lock | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        shared = None if store_lock is None else StoreLock(store_lock)
        self.producers = StoreLane(self.loop, "store-producers", PRODUCER_THREADS, shared)
        self.workers = StoreLane(self.loop, "store-workers", WORKER_THREADS, shared)
        self._background: set[asyncio.Task[None]] = set()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread_id

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the loop: now when called there, soon otherwise."""
        if self.in_loop():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, work: Coroutine[object, object, None]) -> None:
        """Run ``work`` on the loop in the background (called on the loop), holding
        on to it until it ends: the loop itself keeps only weak references."""
        task = self.loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        self.producers.close()
        self.workers.close()


class LoopQueue(Generic[T]):
    """A queue that any thread puts to and one task on the loop gets from."""

    def __init__(self, bridge: LoopBridge) -> None:
        self._bridge = bridge
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> None:
        self._bridge.call(self._queue.put_nowait, item)

    async def get(self) -> T:
        return await self._queue.get()

    def get_nowait(self) -> T:
        """The next item; raises ``asyncio.QueueEmpty`` when there is none."""
        return self._queue.get_nowait()
