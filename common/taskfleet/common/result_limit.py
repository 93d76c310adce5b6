"""The size limit on what an attempt reports: its result, or its error.

A task's result travels in a Results batch, is stored by the master and is
sent whole to every client that waits on it, so it has a limit like a
payload's. The worker applies it before it reports, and the master again on
what arrives (a worker in another language may not apply it at all).
"""

from __future__ import annotations

import dataclasses

from taskfleet.common.codec import utf8_text
from taskfleet.common.model import Outcome, TaskError, TaskState

RESULT_TOO_LARGE = "ResultTooLarge"
_TRUNCATED = "\n[... {} bytes cut: over the result limit of {} bytes]\n"
_NOTE_BYTES = 100  # room kept for each note, so a cut error is within the limit


def limit_outcome(outcome: Outcome, max_result_bytes: int) -> Outcome:
    """``outcome`` as it may be reported under ``max_result_bytes``.

    A result over the limit ends the task FAILED with ``ResultTooLarge``, for
    good: the same call would return as much again. An error over the limit
    keeps its type and is cut short instead, in the middle of its message and
    of its traceback: the failure matters more than its full text. Text that is
    not UTF-8 goes escaped (``codec.utf8_text``)."""
    result_bytes = len(outcome.result)
    if result_bytes > max_result_bytes:
        too_large = TaskError(
            RESULT_TOO_LARGE,
            f"the result is {result_bytes} bytes, over the limit of {max_result_bytes} "
            "(--max-result-bytes); put large results on shared storage and return "
            "their path or URL instead",
        )
        return Outcome(outcome.ref, TaskState.FAILED, error=too_large)
    error = outcome.error
    if error is None:
        return outcome
    try:
        message, traceback = error.message.encode(), error.traceback.encode()
        error.type.encode()
    except UnicodeEncodeError:  # a lone surrogate: see codec.utf8_text
        error = TaskError(
            utf8_text(error.type), utf8_text(error.message), utf8_text(error.traceback)
        )
        outcome = dataclasses.replace(outcome, error=error)
        message, traceback = error.message.encode(), error.traceback.encode()
    if len(message) + len(traceback) <= max_result_bytes:
        return outcome
    budget = max(0, max_result_bytes - 2 * _NOTE_BYTES)
    message_keep = min(len(message), budget // 2)
    traceback_keep = budget - message_keep
    shortened = TaskError(
        error.type,
        _shorten(message, message_keep, max_result_bytes),
        _shorten(traceback, traceback_keep, max_result_bytes),
    )
    return dataclasses.replace(outcome, error=shortened)


def _shorten(text: bytes, keep: int, limit: int) -> str:
    """``text`` cut to ``keep`` bytes (plus a note) from its middle: a traceback
    starts with where it was called and ends with what was raised."""
    if len(text) <= keep:
        return text.decode()
    head = text[: keep // 2].decode(errors="ignore")
    tail = text[len(text) - (keep - keep // 2) :].decode(errors="ignore")
    return head + _TRUNCATED.format(len(text) - keep, limit) + tail
