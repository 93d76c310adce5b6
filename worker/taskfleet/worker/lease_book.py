"""The worker's book of the leases it holds until their outcome is ready: jobs
prefetched (waiting for a pool slot), running, and revoked while running.

No gRPC and no threads here: the book is plain state, changed by the one
thread that holds the worker's lock, so it is tested in-process. Leases whose
outcome is ready but not yet acknowledged are in ``batches.Batches``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import NamedTuple

from taskfleet.common.model import LeaseRef
from taskfleet.worker.execute import Job


class Finished(NamedTuple):
    """A job that left the pool: how long it held its slot, and whether its
    outcome is still wanted (not when its lease was revoked while it ran)."""

    job: Job
    run_s: float
    wanted: bool


class LeaseBook:
    """Prefetched and running jobs, and the running ones revoked.

    Draining turns the book away from new work: prefetched jobs are handed
    back and nothing starts any more."""

    def __init__(self) -> None:
        self.running: dict[LeaseRef, Job] = {}
        self.prefetched: deque[Job] = deque()
        self.revoked: set[LeaseRef] = set()
        self.draining = False
        self._started_at: dict[LeaseRef, float] = {}  # monotonic, per running job

    def accept(self, jobs: list[Job]) -> list[Job]:
        """Take ``jobs`` leased for this worker; returns those to hand back
        straight away (the credit was asked for before a drain began)."""
        if self.draining:
            return jobs
        self.prefetched.extend(jobs)
        return []

    def start(self, slots: int) -> list[Job]:
        """The next prefetched jobs, as many as ``slots`` free pool slots take (none
        while draining), now counted as running. Their time limits count from
        here, not from when they arrived: a prefetched job may have waited."""
        if self.draining:
            return []
        started = []
        now, started_at = time.time(), time.monotonic()
        for _ in range(min(slots, len(self.prefetched))):
            job = self.prefetched.popleft()
            if job.timeout_s:
                job = dataclasses.replace(job, deadline=now + job.timeout_s)
            self.running[job.ref] = job
            self._started_at[job.ref] = started_at
            started.append(job)
        return started

    def finish(self, ref: LeaseRef) -> Finished | None:
        """Take the job of ``ref`` out of the book as the pool reports it; None
        if the book does not hold it."""
        job = self.running.pop(ref, None)
        started_at = self._started_at.pop(ref, None)
        revoked = self.revoked  # mostly empty: a LeaseRef's hash is dear
        wanted = not (revoked and ref in revoked)
        if not wanted:
            revoked.remove(ref)
        if job is None or started_at is None:
            return None
        return Finished(job, time.monotonic() - started_at, wanted)

    def revoke(self, refs: list[LeaseRef]) -> list[Job]:
        """Forget prefetched jobs of ``refs``; returns the running ones, for the
        caller to cancel in the pool (their outcomes will not be wanted)."""
        revoked = set(refs)
        self.prefetched = deque(j for j in self.prefetched if j.ref not in revoked)
        running = [self.running[r] for r in refs if r in self.running]
        self.revoked.update(job.ref for job in running)
        return running

    def drain(self) -> list[Job]:
        """Stop taking work; returns the prefetched jobs, to hand back."""
        self.draining = True
        unstarted = list(self.prefetched)
        self.prefetched.clear()
        return unstarted

    def held(self) -> list[LeaseRef]:
        """The leases of running and prefetched jobs."""
        return [*self.running, *(j.ref for j in self.prefetched)]

    def holding(self) -> int:
        """How many jobs the book holds: running or waiting to run."""
        return len(self.running) + len(self.prefetched)
