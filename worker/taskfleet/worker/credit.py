"""How many tasks the worker asks the master for: its credit.

A worker holds one task per pool slot plus a prefetch of what the pool gets
through in four round trips to the master (COVERED_ROUND_TRIPS), so a slot
never waits on the network, and never more than ``--prefetch``, nor about
PREFETCH_BYTES of payloads. Long tasks get a prefetch of one: nothing waits
behind them that another worker could run. Three moving averages size the
prefetch: how long a job holds its slot, how long the master takes to
acknowledge a batch, and how large a payload is. No gRPC and no threads here.
"""

from __future__ import annotations

import math

AVERAGE_WEIGHT = 0.1  # weight of the newest sample in the moving averages
# Round trips of work the prefetch covers. Credit rides on a Results batch, and
# one batch at a time is unacknowledged, so what is asked for now arrives a
# round trip later, while the next batch gathers: covering one round trip left
# the pool waiting half the time and cut batches to ~20 tasks. Two doubled a busy
# worker's batches, W1 costing about a fifth less CPU per task; four gave W1
# another 8% (median of 13 runs against 17, alternating: 12,246 -> 13,266/s).
COVERED_ROUND_TRIPS = 4
# Payloads the prefetch holds, about: short jobs with large payloads would
# otherwise fill the worker's memory with work it has not started.
PREFETCH_BYTES = 32 * 1024 * 1024


class Credit:
    """The credit sums of one worker; ``requested`` is what was asked for on the
    current stream and has not arrived yet."""

    def __init__(self, slots: int, prefetch: int, gather_s: float) -> None:
        self.slots = slots
        self.prefetch = prefetch
        # Credit goes out with outcomes, which may gather this long first.
        self.gather_s = gather_s
        self.requested = 0
        self.job_s: float | None = None
        self.round_trip_s: float | None = None
        self.payload_bytes: float | None = None  # per job

    def job_took(self, run_s: float) -> None:
        """A job held its pool slot for ``run_s``."""
        self.job_s = _average(self.job_s, run_s)

    def round_trip_took(self, round_trip_s: float) -> None:
        """The master acknowledged a batch ``round_trip_s`` after it was sent."""
        self.round_trip_s = _average(self.round_trip_s, round_trip_s)

    def capacity(self) -> int:
        """How many tasks to hold: one per slot, plus the prefetch."""
        covering = 1
        if self.job_s and self.round_trip_s:
            waiting_s = self.round_trip_s + self.gather_s
            covering = math.ceil(COVERED_ROUND_TRIPS * self.slots * waiting_s / self.job_s)
        if self.payload_bytes:
            covering = min(covering, max(1, int(PREFETCH_BYTES / self.payload_bytes)))
        return self.slots + min(self.prefetch, covering)

    def wanted(self, holding: int, draining: bool) -> int:
        """How many more tasks to ask for while holding ``holding`` (0 or less:
        none); a draining worker asks for none."""
        if draining:
            return 0
        return self.capacity() - holding - self.requested

    def asked(self, tasks: int) -> None:
        """``tasks`` more were asked for."""
        self.requested += tasks

    def arrived(self, tasks: int, payload_bytes: int) -> None:
        """``tasks`` arrived from the master, with ``payload_bytes`` of payloads."""
        self.requested = max(0, self.requested - tasks)
        if tasks:
            self.payload_bytes = _average(self.payload_bytes, payload_bytes / tasks)

    def new_stream(self) -> None:
        """A new stream starts: what was asked for on the old one will not come."""
        self.requested = 0


def _average(average: float | None, sample: float) -> float:
    """Exponentially weighted moving average; the first sample starts it."""
    return sample if average is None else average + AVERAGE_WEIGHT * (sample - average)
