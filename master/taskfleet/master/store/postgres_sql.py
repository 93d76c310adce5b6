"""The SQL statements of the PostgreSQL store that a method would drown in: the
claim of a lease, the insert of new tasks, the record of outcomes and the expiry
of lapsed leases, each a single statement over arrays (one round trip a batch).
See postgres.py for why each is written so."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskfleet.common.model import LeaseRef, TaskSpec
from taskfleet.master.store.deps import SqlDeps
from taskfleet.master.store.rows import (
    COLUMNS,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    spec_values,
)

READY = f"state = {PENDING} AND ready"
DELAYED = f"state = {PENDING} AND NOT ready"
# FOR SHARE: a parent cannot end between the check of its state and the edge to it.
DEPS = SqlDeps("%s", " FOR SHARE")

TCOLUMNS = ", ".join(f"t.{c.strip()}" for c in COLUMNS.split(","))

# A finished task's deletion time: its own TTL, else the policy's default
# (the parameter, already added to now; 0 for never).
EXPIRES = "CASE WHEN t.result_ttl_s > 0 THEN %(now)s + t.result_ttl_s ELSE %(expiry)s END"

INSERT = """INSERT INTO tasks (id, name, queue, payload, content_type, priority, max_attempts,
    timeout_s, not_before, idempotency_key, metadata, result_ttl_s, state, ready, ready_at,
    created_at, start_by, ckey, ckey_limit)
    SELECT id, name, queue, payload, content_type, priority, max_attempts, timeout_s,
        not_before, idempotency_key, metadata, result_ttl_s, %s::smallint, ready_at <= %s,
        ready_at, %s::float8, start_by, ckey, ckey_limit FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::bytea[], %b::text[], %b::int[], %b::int[],
        %b::float8[], %b::float8[], %b::text[], %b::text[], %b::float8[], %b::float8[],
        %b::float8[], %b::text[], %b::int[]
    ) AS s(id, name, queue, payload, content_type, priority, max_attempts, timeout_s,
        not_before, idempotency_key, metadata, result_ttl_s, ready_at, start_by, ckey,
        ckey_limit)"""


# The best `limit` ready tasks of each queue (and name), from its index, locked
# unless another lease holds them; the outer ORDER BY picks the best overall.
# The claim's commit alone does not wait for the flush (postgres.py's docstring);
# a volatile CTE is evaluated once, before any row is claimed. A crash can so
# undo a claim and leave the task's lease number as it was; the lease epoch
# keeps that number from being handed out twice: every lease is at least
# epoch << 32 (taskfleet_lease_floor, postgres_schema.py), and the first claim
# after a crash finds no live epoch and starts the next (NEW_LEASE_EPOCH).
CLAIM = f"""WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true)),
    chosen AS (
    SELECT c.seq FROM unflushed, {{sources}}, LATERAL (
        SELECT seq, priority FROM tasks
        WHERE {READY} AND queue = q.queue {{name_term}}
        ORDER BY {{order}} LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ) c ORDER BY c.priority DESC, c.seq LIMIT %(limit)s)
    UPDATE tasks t SET state = {RUNNING}, attempts = attempts + 1,
        lease = greatest(lease + 1, (SELECT taskfleet_lease_floor())),
        worker_id = %(worker)s, started_at = %(now)s, lease_deadline = %(deadline)s
    FROM chosen WHERE t.seq = chosen.seq RETURNING t.priority, t.seq, {TCOLUMNS}"""

# What taskfleet_lease_floor raises when no epoch is live: after a crash, or
# before the database's first claim.
NO_LEASE_EPOCH = "TF001"
# The next lease epoch, committed waiting for the flush: claims see it only once
# it is on disk, so no lease of it is used before then. Concurrent first claims
# each start one, which is harmless: the live epoch is the greater.
NEW_LEASE_EPOCH = """WITH flushed AS (SELECT set_config('synchronous_commit', 'on', true)),
    bumped AS (UPDATE lease_epoch SET epoch = epoch + 1 FROM flushed RETURNING epoch)
    INSERT INTO lease_epoch_live (epoch) SELECT epoch FROM bumped
    ON CONFLICT (one) DO UPDATE SET epoch = greatest(lease_epoch_live.epoch, excluded.epoch)"""

CLAIM_BY_QUEUE = CLAIM.format(
    sources="unnest(%(queues)b::text[]) q(queue)", name_term="", order="priority DESC, seq"
)
# The name as a range, not with `=`: with `=` the planner takes the name for a
# constant, finds tasks_ready_by_queue as well ordered as tasks_ready_by_name,
# and may scan it filtering by name, reading every ready task of the queue for
# each name that has none (33 ms a lease at 20,000 queued, measured). Ordered
# by name too, only tasks_ready_by_name yields the order without a sort.
CLAIM_BY_NAME = CLAIM.format(
    sources="unnest(%(queues)b::text[]) q(queue), unnest(%(names)b::text[]) n(name)",
    name_term="AND name >= n.name AND name <= n.name",
    order="name, priority DESC, seq",
)

REFS = "unnest(%(ids)b::text[], %(leases)b::bigint[]) AS r(id, lease)"
# The fence of an outcome, a renewal or a release: the lease must be current.
FENCE = f"t.id = r.id AND t.state = {RUNNING} AND t.lease = r.lease"

# Outcomes as arrays, one element each; a FAILED one with a ready_at runs again.
RECORD = f"""UPDATE tasks t SET
    state = CASE WHEN r.ready_at IS NOT NULL THEN {PENDING} ELSE r.state END,
    result = CASE WHEN r.state = {SUCCEEDED} THEN r.result ELSE t.result END,
    result_content_type = CASE WHEN r.state = {SUCCEEDED} THEN r.result_content_type
        ELSE t.result_content_type END,
    error_type = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_type
        ELSE t.error_type END,
    error_message = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_message
        ELSE t.error_message END,
    error_traceback = CASE WHEN r.state = {SUCCEEDED} THEN NULL
        WHEN r.state = {FAILED} OR r.error_type IS NOT NULL THEN r.error_traceback
        ELSE t.error_traceback END,
    ready = CASE WHEN r.ready_at IS NOT NULL THEN r.ready_at <= %(now)s ELSE t.ready END,
    ready_at = CASE WHEN r.ready_at IS NOT NULL THEN r.ready_at ELSE t.ready_at END,
    finished_at = CASE WHEN r.ready_at IS NOT NULL THEN t.finished_at ELSE %(now)s END,
    expires_at = CASE WHEN r.ready_at IS NOT NULL THEN t.expires_at ELSE {EXPIRES} END
    FROM unnest(%(ids)b::text[], %(leases)b::bigint[], %(states)b::smallint[],
        %(results)b::bytea[], %(types)b::text[], %(error_types)b::text[],
        %(messages)b::text[], %(tracebacks)b::text[], %(ready_ats)b::float8[])
        WITH ORDINALITY AS r(id, lease, state, result, result_content_type, error_type,
            error_message, error_traceback, ready_at, i)
    WHERE {FENCE} RETURNING r.i, {TCOLUMNS}"""

EXPIRE = f"""UPDATE tasks t SET lost_leases = t.lost_leases + 1, lost_by = r.lost_by,
    state = CASE WHEN r.error_type IS NULL THEN {PENDING} ELSE {FAILED} END,
    ready = CASE WHEN r.error_type IS NULL THEN true ELSE t.ready END,
    ready_at = CASE WHEN r.error_type IS NULL THEN %(now)s ELSE t.ready_at END,
    error_type = coalesce(r.error_type, t.error_type),
    error_message = coalesce(r.error_message, t.error_message),
    error_traceback = CASE WHEN r.error_type IS NULL THEN t.error_traceback ELSE '' END,
    finished_at = CASE WHEN r.error_type IS NULL THEN t.finished_at ELSE %(now)s END,
    expires_at = CASE WHEN r.error_type IS NULL THEN t.expires_at ELSE {EXPIRES} END
    FROM unnest(%(seqs)s::bigint[], %(lost_by)s::text[], %(error_types)s::text[],
        %(messages)s::text[]) WITH ORDINALITY AS r(seq, lost_by, error_type, error_message, i)
    WHERE t.seq = r.seq RETURNING r.i, {TCOLUMNS}"""


def without_keys(claim: str) -> str:
    """``claim`` passing over tasks whose concurrency key is in ``%(keys)s``."""
    return claim.replace(" ORDER BY ", " AND ckey <> ALL(%(keys)s::text[]) ORDER BY ", 1)


def task_row(task_id: str, spec: TaskSpec, now: float) -> tuple[Any, ...]:
    """One new task's element of each array ``INSERT`` unnests."""
    return (
        task_id,
        *spec_values(spec),
        max(spec.not_before, now),
        spec.expires_at,
        spec.concurrency_key,
        spec.concurrency_limit,
    )


def ref_arrays(refs: Sequence[LeaseRef]) -> dict[str, list[Any]]:
    return {"ids": [ref.task_id for ref in refs], "leases": [ref.lease for ref in refs]}
