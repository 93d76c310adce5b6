"""The worker's local pool: the seam between the connection to the master and
the code that runs tasks.

The connection side asks ``free_slots()``, leases that many tasks, ``submit``s
them and gets every outcome back through ``on_done``, which the pool calls
from a pool-internal thread with a list of results: every job's exactly once
(unless closed with ``wait=False``), and all those a pool thread has at hand
together, so the caller takes its lock and tops the pool up once for them.
``on_done`` must be cheap: the caller batches results itself.

A pool whose own thread dies of a bug cannot keep that promise; it says so in
``failure``, and the caller must stop (a worker exits, and the master's leases
on its tasks lapse) rather than hold tasks that will never be reported.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Sequence

from taskfleet.common.errors import ConfigError
from taskfleet.common.model import LeaseRef
from taskfleet.worker.execute import Job, JobResult, failed, safe_str

log = logging.getLogger(__name__)

OnDone = Callable[[list[JobResult]], None]
EXIT_POOL_BROKEN = 70  # a worker whose pool broke (sysexits' EX_SOFTWARE)


class Pool(abc.ABC):
    """Runs up to ``size`` jobs at once."""

    size: int

    def __init__(self, size: int, task_modules: Sequence[str], on_done: OnDone) -> None:
        if size < 1:
            raise ConfigError(f"--concurrency: must be at least 1, not {size}")
        self.size = size
        self.task_modules = tuple(task_modules)
        self.on_done = on_done
        self.failure: str | None = None  # why a pool thread died, once one has

    def _thread(self, body: Callable[[], None], name: str) -> threading.Thread:
        """A daemon thread running ``body``; should ``body`` raise, the pool is broken."""

        def run() -> None:
            try:
                body()
            except BaseException as exc:
                log.critical("the pool is broken: its thread %s died", name, exc_info=True)
                self.failure = f"pool thread {name} died: {type(exc).__name__}: {safe_str(exc)}"

        return threading.Thread(target=run, name=name, daemon=True)

    @abc.abstractmethod
    def start(self) -> None:
        """Start the processes or threads; may block until they can take jobs."""

    @abc.abstractmethod
    def submit(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs``; the caller has checked that ``free_slots()`` has room for them."""

    @abc.abstractmethod
    def free_slots(self) -> int:
        """How many more jobs may be submitted now."""

    @abc.abstractmethod
    def cancel(self, ref: LeaseRef) -> bool:
        """Stop the job if it has not been reported yet; True if so.

        Its ``on_done`` then reports ``cancelled=True`` with error type "Cancelled".
        """

    @abc.abstractmethod
    def close(self, wait: bool = True) -> None:
        """Stop the pool.

        ``wait=True`` lets submitted jobs finish and report first; ``wait=False``
        abandons them at once, with no further ``on_done``. Not to be called
        from ``on_done``, which runs on a thread that close may wait for.
        """


class JobLedger:
    """The jobs submitted and not yet reported, shared by a pool's threads.

    A job can end several ways at nearly the same moment (its result arrives as
    its deadline strikes, a cancel comes in, its process dies); the ledger is
    the one place that decides which report wins, so ``on_done`` reports each
    job exactly once. Once ``cancel`` has said yes, only the cancelled report does.
    """

    def __init__(self, on_done: OnDone) -> None:
        self._on_done = on_done
        self._changed = threading.Condition()
        self._live: set[LeaseRef] = set()
        self._cancelling: set[LeaseRef] = set()
        self._reporting = 0  # on_done calls in progress
        self.closed = False
        self.abandoned = False

    def add(self, jobs: Sequence[Job]) -> None:
        """Take ``jobs`` on; refused once the pool is closing."""
        with self._changed:
            if self.closed:
                raise RuntimeError("the pool is closed")
            self._live.update(job.ref for job in jobs)

    def cancel(self, ref: LeaseRef) -> bool:
        """Claim ``ref``'s report for a cancel; False if it is no longer ours to cancel."""
        with self._changed:
            if ref not in self._live or ref in self._cancelling:
                return False
            self._cancelling.add(ref)
            return True

    def cancelling(self) -> list[LeaseRef]:
        """The jobs cancelled but not yet reported."""
        with self._changed:
            return list(self._cancelling)

    def wanted(self, jobs: Sequence[Job]) -> list[Job]:
        """Those of ``jobs`` that still have a point running (unreported, not
        cancelled or abandoned)."""
        with self._changed:
            if self.abandoned:
                return []
            live, cancelling = self._live, self._cancelling
            return [j for j in jobs if j.ref in live and not (cancelling and j.ref in cancelling)]

    def __len__(self) -> int:
        with self._changed:
            return len(self._live)

    def close(self, *, abandon: bool) -> None:
        """Refuse new jobs; with ``abandon``, drop every report from now on."""
        with self._changed:
            self.closed = True
            self.abandoned = self.abandoned or abandon
            self._changed.notify_all()

    def wait_drained(self) -> None:
        """Block until every job has been reported (and on_done has returned)."""
        with self._changed:
            self._changed.wait_for(lambda: self.abandoned or not (self._live or self._reporting))

    def finish(self, results: Sequence[JobResult]) -> None:
        """Report, in one ``on_done`` call, those of ``results`` whose job was not
        reported already nor claimed by a cancel."""
        with self._changed:
            if self.abandoned:
                return
            live, cancelling = self._live, self._cancelling
            reported = []
            for result in results:
                ref = result.ref
                if ref not in live:
                    continue
                if cancelling and ref in cancelling:
                    if not result.cancelled:
                        continue
                    cancelling.remove(ref)
                live.remove(ref)
                reported.append(result)
            if not reported:
                return
            self._reporting += 1
        try:
            self._on_done(reported)
        except Exception:
            # The caller's bug must not kill the pool thread that reports.
            log.exception("on_done failed for tasks %s", ", ".join(r.ref.task_id for r in reported))
        finally:
            with self._changed:
                self._reporting -= 1
                if self.closed:  # only wait_drained waits, and only once closed
                    self._changed.notify_all()


def abandon_broken(pool: Pool) -> int:
    """Close a broken pool at once and return the worker's exit code: the pool will
    never report the tasks it holds, and a worker that ran on would hold them for
    good. Once it exits, they are handed out again (their leases lapse)."""
    log.critical(
        "stopping: the pool is broken (%s); its tasks will be handed out again", pool.failure
    )
    pool.close(wait=False)
    return EXIT_POOL_BROKEN


def timed_out(job: Job) -> JobResult:
    """The report for a job that ran past its deadline."""
    return failed(
        job.ref, "TimeLimitExceeded", f"task exceeded its time limit of {job.timeout_s:g} s"
    )


def cancelled(ref: LeaseRef) -> JobResult:
    """The report for a cancelled job."""
    return failed(ref, "Cancelled", "task cancelled", cancelled=True)
