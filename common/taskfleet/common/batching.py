"""Cutting batches by count and by bytes, so no gRPC message nears its limit.

Every batch that crosses the wire (a worker's Results, the master's
Assignments, a client's Submit) holds items of very different sizes: a
thousand small tasks fit in one message, six 30 MB results do not. A batch cut
by count alone grows past ``MAX_MESSAGE_BYTES``, its send fails, and sending
it again fails the same way for ever. So every sender cuts its batches here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from taskfleet.common.channel import MAX_MESSAGE_BYTES
from taskfleet.common.model import Outcome, TaskSpec

T = TypeVar("T")

# A batch is cut before it passes this many bytes. Far below the message limit,
# so an estimate that misses protobuf's framing by a few percent cannot matter;
# large enough that the per-message cost is nothing next to 4 MiB of data.
BATCH_BYTES = 4 * 1024 * 1024
# The largest one payload or result may be: a task's payload and its result
# must fit together in one message (a Task carries both), with room to spare.
MAX_ITEM_BYTES = (MAX_MESSAGE_BYTES * 3 // 8) & ~0xFFFFF  # 24 MiB
# What a task, outcome or spec costs beyond its variable-length fields: ids,
# names, times, tags; generous, so a batch of tiny items is cut by count first.
ITEM_OVERHEAD_BYTES = 512


def cut(
    items: Iterable[T],
    size_bytes: Callable[[T], int],
    *,
    max_count: int,
    max_bytes: int = BATCH_BYTES,
) -> Iterator[list[T]]:
    """Split ``items``, in order, into lists of at most ``max_count`` items whose
    ``size_bytes`` add up to at most ``max_bytes``; an item larger than
    ``max_bytes`` on its own travels alone."""
    batch: list[T] = []
    batch_bytes = 0
    for item in items:
        item_bytes = size_bytes(item)
        if batch and (len(batch) >= max_count or batch_bytes + item_bytes > max_bytes):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += item_bytes
    if batch:
        yield batch


def spec_bytes(spec: TaskSpec) -> int:
    """About what ``spec`` costs on the wire."""
    return (
        ITEM_OVERHEAD_BYTES
        + len(spec.payload)
        + len(spec.idempotency_key)
        + metadata_bytes(spec.metadata)
    )


def metadata_bytes(metadata: dict[str, str]) -> int:
    """The bytes of ``metadata``'s keys and values in UTF-8."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def outcome_bytes(outcome: Outcome) -> int:
    """About what ``outcome`` costs on the wire."""
    size = ITEM_OVERHEAD_BYTES + len(outcome.result)
    if outcome.error is not None:
        size += len(outcome.error.message) + len(outcome.error.traceback)
    return size
