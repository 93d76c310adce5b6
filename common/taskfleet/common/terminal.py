"""What the ``taskfleet`` command shows a person at a terminal: a rich progress
bar while waiting for tasks, and rich tables for ``stats``.

Only for streams that are terminals; pipes and files keep the plain, stable
output that cli_output.py prints. rich is imported only when it is used, so scripted
calls do not pay for it.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from taskfleet.common.model import Stats, TaskState

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def is_terminal(stream: TextIO) -> bool:
    """Whether a person is likely watching ``stream`` (a TTY that can redraw)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except ValueError:  # closed stream
        return False


class WaitProgress:
    """A progress bar on stderr over ``total`` tasks, or nothing when ``enabled``
    is false. Use as a context manager and call ``finished`` once per final task.

    While the bar is live, what the program prints to stdout goes above the bar
    when stdout is the terminal too, and straight to stdout otherwise (so piped
    results stay clean).
    """

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._total = total
        self._enabled = enabled
        self._counts: dict[TaskState, int] = {}
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    def __enter__(self) -> WaitProgress:
        if not self._enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[outcome]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            redirect_stdout=is_terminal(sys.stdout),
        )
        self._progress.__enter__()
        self._bar = self._progress.add_task("tasks", total=self._total, outcome="")
        return self

    def finished(self, state: TaskState) -> None:
        """Count one task that reached a final ``state``."""
        self._counts[state] = self._counts.get(state, 0) + 1
        if self._progress is None or self._bar is None:
            return
        self._progress.update(self._bar, advance=1, outcome=self._outcome())

    def _outcome(self) -> str:
        colours = {
            TaskState.SUCCEEDED: "green",
            TaskState.FAILED: "red",
            TaskState.CANCELLED: "yellow",
        }
        return " ".join(
            f"[{colour}]{self._counts[state]} {state.name.lower()}[/]"
            for state, colour in colours.items()
            if self._counts.get(state)
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)


def print_stats(stats: Stats) -> None:
    """``stats`` as rich tables on stdout: queues by state, workers, masters."""
    from rich.console import Console
    from rich.table import Table

    from taskfleet.common.cli_output import age_text, oldest_pending_age_s

    colours = {
        TaskState.PENDING: "cyan",
        TaskState.RUNNING: "blue",
        TaskState.SUCCEEDED: "green",
        TaskState.FAILED: "red",
        TaskState.CANCELLED: "yellow",
    }
    queues = Table(title="Queues", title_justify="left")
    queues.add_column("QUEUE", no_wrap=True)
    for state in TaskState:
        queues.add_column(state.name, justify="right", style=colours.get(state))
    queues.add_column("OLDEST PENDING", justify="right")
    now = time.time()
    for q in stats.queues:
        queues.add_row(
            q.queue,
            *(str(q.counts.get(s, 0)) for s in TaskState),
            age_text(oldest_pending_age_s(q, now)),
        )

    workers = Table(title="Workers", title_justify="left")
    workers.add_column("WORKER", no_wrap=True)
    workers.add_column("HOST")
    workers.add_column("QUEUES")
    workers.add_column("SLOTS", justify="right")
    workers.add_column("RUNNING", justify="right")
    for w in stats.workers:
        workers.add_row(
            w.worker_id, w.hostname, ",".join(w.queues), str(w.concurrency), str(w.running)
        )

    masters = Table(title="Masters", title_justify="left")
    for column in ("MASTER", "HOST", "LISTEN"):
        masters.add_column(column, no_wrap=column == "MASTER")
    for m in stats.masters:
        masters.add_row(m.master_id, m.hostname, m.listen)

    console = Console()
    console.print(queues)
    console.print()
    console.print(workers)
    if stats.unserved():
        unserved = Table(title="Pending tasks no connected worker takes", title_justify="left")
        for column in ("QUEUE", "NAME", "PENDING"):
            unserved.add_column(column, justify="right" if column == "PENDING" else "left")
        for p in stats.unserved():
            unserved.add_row(p.queue, p.name, str(p.count), style="yellow")
        console.print()
        console.print(unserved)
    console.print()
    console.print(masters)
