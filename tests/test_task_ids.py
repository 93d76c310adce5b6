"""Task ids: unique, time-ordered, and never shared with a forked child."""

from __future__ import annotations

import os
import re

from taskfleet.master.store.base import new_task_id


def test_ids_are_distinct_hex_and_ordered_by_their_millisecond() -> None:
    ids = [new_task_id() for _ in range(20_000)]  # several draws of random parts
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", task_id) for task_id in ids)
    prefixes = [task_id[:12] for task_id in ids]
    assert prefixes == sorted(prefixes)


def test_a_forked_child_draws_random_parts_of_its_own() -> None:
    new_task_id()  # the parent holds a supply of random parts now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write_end, "".join(new_task_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    child = {text[i + 12 : i + 32] for i in range(0, len(text), 32)}
    parent = {new_task_id()[12:] for _ in range(100)}
    assert len(child) == 100
    assert not child & parent
