"""The garbage collector's settings for taskfleet's own long-running processes."""

from __future__ import annotations

import gc

# New container objects between two collections of the youngest generation
# (CPython's default is 700). The middle and oldest generations are collected
# every tenth collection of the one below, so this also sets how often the
# oldest one, the costly collection, can come.
YOUNG_COLLECTION_OBJECTS = 10_000


def settle_after_startup() -> None:
    """Take what start-up created out of the collector's sight, and collect less often.

    A master or worker allocates a few container objects per task (a message, a
    task record), nearly all freed by reference counting, which the collector
    never replaces. At CPython's default a collection starts every 700 of them,
    and every hundredth of those walks every object the process holds: the
    tens of thousands that importing grpc, protobuf and the task modules made,
    and, in a master on the memory store, every stored task. Over 120,000 W1
    tasks on the memory store the collector took 1.45 s of the master's CPU,
    about 12 µs a task, in pauses of up to 0.17 s; with ten times fewer
    collections and start-up frozen, 0.30 s (docs/benchmarks.md, ninth run).

    Frozen objects stay alive as long as anything refers to them and are freed by
    reference counting as before; only a cycle made of them could no longer be
    collected, and start-up's objects (modules, classes, functions) live as long
    as the process anyway.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_OBJECTS, middle, oldest)
