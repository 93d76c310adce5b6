"""The garbage collector's settings for taskfleet's own long-running processes."""

from __future__ import annotations

import gc


def settle_after_startup() -> None:
    """Take what start-up created out of the collector's sight.

    Every collection of the oldest generation walks every object the process
    holds, and most of a master's or worker's objects are the tens of thousands
    that importing grpc, protobuf, the store and the task modules made, which
    live as long as the process. Frozen, they are never walked again: over
    120,000 W1 tasks the collector's CPU in a master fell from 0.86 s to 0.53 s
    on the SQLite store, and from 1.40 s to 1.18 s on the memory store, whose
    tasks it then still walked (docs/benchmarks.md, ninth run; the store now keeps
    finished ones where the collector never looks, memory_slots.py).

    Frozen objects are freed by reference counting as before; only a cycle made
    of them could no longer be collected, and start-up's objects (modules,
    classes, functions) live as long as the process anyway. Collecting the young
    generation less often saved more CPU still, but lengthened W3's p99 by
    about 0.4 ms, so the thresholds stay CPython's.
    """
    gc.collect()
    gc.freeze()
