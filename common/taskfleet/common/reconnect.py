"""The one reconnect policy: how a worker comes back to a master (or a classic
manager) that went away.

Backoff from 0.1 s doubling to 5 s, jittered, so workers that lost the same
master do not come back in waves and one that restarts is found within
seconds. The last error is raised once retrying stops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import tenacity

from taskfleet.common.backoff import backoff_s

RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 5.0


def reconnect_policy(
    retry_if: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException | None], None],
    done: threading.Event | None = None,
) -> tenacity.Retrying:
    """Retry a session while ``retry_if`` says its error is worth it, calling
    ``on_retry`` (to log) before each wait; once ``done`` is set, waits end
    early and retrying stops, so a stopping worker is not held by a backoff."""

    def sleep(seconds: float) -> None:
        if done is None:
            tenacity.nap.sleep(seconds)
        else:
            done.wait(seconds)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=lambda state: backoff_s(
            state.attempt_number, base_s=RECONNECT_BASE_S, cap_s=RECONNECT_CAP_S
        ),
        stop=(lambda state: done.is_set()) if done is not None else tenacity.stop_never,
        sleep=sleep,
        before_sleep=lambda state: on_retry(state.outcome.exception() if state.outcome else None),
        reraise=True,
    )


def first_reconnect_s() -> float:
    """The wait before reconnecting a session that was up and then ended: the
    policy's first backoff, so a master restarting is not called in a tight loop."""
    return backoff_s(1, base_s=RECONNECT_BASE_S, cap_s=RECONNECT_CAP_S)
