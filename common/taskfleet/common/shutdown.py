"""The one shutdown: the first SIGTERM/SIGINT asks a process to stop gracefully
(a master shuts down, a worker drains); a second one exits at once with
``EXIT_FORCED``, for an operator who will not wait.

Exiting at once kills the process's pool processes first: orphaned, they would
run their tasks on with no one to enforce time limits or report results. What
the process held is not lost: the master's leases on a worker's tasks lapse.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

EXIT_FORCED = 130  # 128 + SIGINT: what a shell reports for a process stopped by Ctrl-C
# A worker drained, but some tasks (or results) were not done within its grace.
EXIT_GRACE_EXPIRED = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_forced() -> NoReturn:
    """Exit at once with ``EXIT_FORCED``, killing any child processes first."""
    try:
        for child in multiprocessing.active_children():
            child.kill()
    finally:
        os._exit(EXIT_FORCED)


def _stop_handler(
    requested: threading.Event | asyncio.Event, log: logging.Logger, doing: str
) -> Callable[[int], None]:
    def on_signal(signum: int) -> None:
        if requested.is_set():
            log.warning("second signal: exiting at once")
            exit_forced()
        log.info("signal %s: %s", signal.Signals(signum).name, doing)
        requested.set()

    return on_signal


def on_stop_signals(requested: threading.Event, log: logging.Logger, doing: str) -> None:
    """From the main thread: the first stop signal sets ``requested`` (logged as
    ``doing``), the second exits at once."""
    handler = _stop_handler(requested, log, doing)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def on_stop_signals_async(
    loop: asyncio.AbstractEventLoop, requested: asyncio.Event, log: logging.Logger, doing: str
) -> None:
    """``on_stop_signals`` for a process that runs on an asyncio loop: the handler
    runs on the loop, where setting an ``asyncio.Event`` is safe."""
    handler = _stop_handler(requested, log, doing)
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, handler, signum)
